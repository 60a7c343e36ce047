"""Reading the few header values a repack needs, fast: a minimal Part 10 reader, pydicom as fallback.

Why not pydicom for everything: ``import pydicom`` alone costs 150-300 ms here (it pulls in
numpy when installed, and ``requests`` through ``pydicom.data``), which the per-file
``storescp -xcr`` command cannot afford (target ~40 ms per file, process start included).
So this module parses the file meta group and the top-level data set itself, for the two
encodings nearly every file uses — Explicit VR Little Endian (and every encapsulated
syntax, whose data set is Explicit VR LE) and Implicit VR Little Endian — reading only up
to the last tag it needs, (0040,0241), and skipping everything else (sequences of defined
or undefined length included). Anything else — Explicit VR Big Endian, deflated data
sets, a character set other than the single-byte ones and UTF-8 (e.g. ISO 2022 code
extensions), a meta group that is not Explicit VR LE — goes to pydicom, which is imported
only then.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from dicomflow.dicomtags import clean_value
from dicomflow.repack.errors import (
    MalformedDicomError,
    NotDicomError,
    UnreadableFileError,
    UnsupportedEncodingError,
)

#: Every tag the repack reads: tag -> (keyword, whether its VR is decoded with the character set).
TAGS: dict[int, tuple[str, bool]] = {
    0x00080005: ("SpecificCharacterSet", False),
    0x00080018: ("SOPInstanceUID", False),
    0x00080020: ("StudyDate", False),
    0x00080021: ("SeriesDate", False),
    0x00080050: ("AccessionNumber", True),
    0x00080060: ("Modality", False),
    0x00081030: ("StudyDescription", True),
    0x0008103E: ("SeriesDescription", True),
    0x00100010: ("PatientName", True),
    0x00100020: ("PatientID", True),
    0x00100030: ("PatientBirthDate", False),
    0x00100040: ("PatientSex", False),
    0x00101010: ("PatientAge", False),
    0x0020000D: ("StudyInstanceUID", False),
    0x0020000E: ("SeriesInstanceUID", False),
    0x00200011: ("SeriesNumber", False),
    0x00200013: ("InstanceNumber", False),
    0x00400241: ("PerformedStationAETitle", False),
}
TAG_OF: dict[str, int] = {keyword: tag for tag, (keyword, _) in TAGS.items()}
_LAST_TAG = max(TAGS)

_CHUNK = 32768
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TRANSFER_SYNTAX = 0x00020010
#: VRs whose explicit encoding has 2 reserved bytes and a 4-byte length.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                       b"UT", b"UV"})
_IMPLICIT_LE = "1.2.840.10008.1.2"
#: Explicit VR Big Endian, Deflated Explicit VR LE, JPIP Referenced Deflate: left to pydicom.
_FOR_PYDICOM = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})
#: Defined Terms of (0008,0005) without code extensions -> Python codec.
_CODECS = {
    "": "latin_1",  # no character set: pydicom's default (iso8859), a superset of ASCII
    "ISO_IR 6": "latin_1",
    "ISO_IR 100": "latin_1",
    "ISO_IR 101": "iso8859_2",
    "ISO_IR 109": "iso8859_3",
    "ISO_IR 110": "iso8859_4",
    "ISO_IR 144": "iso8859_5",
    "ISO_IR 127": "iso8859_6",
    "ISO_IR 126": "iso8859_7",
    "ISO_IR 138": "iso8859_8",
    "ISO_IR 148": "iso8859_9",
    "ISO_IR 203": "iso8859_15",
    "ISO_IR 166": "iso8859_11",
    "ISO_IR 13": "shift_jis",
    "ISO_IR 192": "utf_8",
    "GB18030": "gb18030",
    "GBK": "gbk",
}
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")


class Header:
    """The values of `TAGS` found in one file, as decoded strings (padding and NULs kept)."""

    __slots__ = ("path", "reader", "values")

    def __init__(self, path: str, values: Mapping[str, str], reader: str):
        self.path = path
        self.values = dict(values)
        #: "fast" or "pydicom": which reader produced the values.
        self.reader = reader

    def get(self, keyword: str) -> str | None:
        """The clean value (NULs removed, trimmed), or None when absent, empty or multi-valued."""
        return clean_value(self.values.get(keyword))

    def log_value(self, keyword: str) -> str:
        """The clean value, or ``"Not defined"`` (the pypx log files' word for a missing value)."""
        value = self.get(keyword)
        return "Not defined" if value is None else value

    def missing_reason(self, keyword: str) -> str | None:
        """Why `keyword` counts as missing ("no such element", "empty value", "multiple values"), or None."""
        raw = self.values.get(keyword)
        if raw is None:
            return "no such element"
        if clean_value(raw) is not None:
            return None
        return "multiple values" if "\\" in raw.replace("\x00", "").strip() else "empty value"

    def __repr__(self) -> str:
        return f"Header({self.path!r}, {self.values!r}, reader={self.reader!r})"


def read_header(path: str) -> Header:
    """Read `TAGS` from the DICOM file at `path`: the fast reader, else pydicom.

    Raises:
        UnreadableFileError: the file cannot be opened or read.
        NotDicomError: no ``DICM`` marker after a 128-byte preamble.
        MalformedDicomError: the header is truncated or inconsistent.
    """
    try:
        return read_header_fast(path)
    except UnsupportedEncodingError:
        return read_header_pydicom(path)


class _Buffer:
    """The start of a file, read in chunks as far as the parser needs."""

    __slots__ = ("data", "eof", "file")

    def __init__(self, file):
        self.file = file
        self.data = bytearray(file.read(_CHUNK))
        self.eof = len(self.data) < _CHUNK

    def has(self, end: int) -> bool:
        """Whether bytes up to `end` are available (reading more as needed)."""
        while len(self.data) < end and not self.eof:
            more = self.file.read(max(_CHUNK, end - len(self.data)))
            if not more:
                self.eof = True
            self.data += more
        return len(self.data) >= end


def read_header_fast(path: str) -> Header:
    """Read `TAGS` with the built-in reader (Explicit/Implicit VR Little Endian only).

    Raises:
        UnsupportedEncodingError: the file needs pydicom (see the module docstring).
        UnreadableFileError, NotDicomError, MalformedDicomError: as `read_header`.
    """
    try:
        with open(path, "rb") as file:
            buf = _Buffer(file)
            if not buf.has(132) or buf.data[128:132] != b"DICM":
                raise NotDicomError(path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)")
            syntax, pos = _read_meta(buf, path)
            if syntax is None:
                raise UnsupportedEncodingError(path, "no TransferSyntaxUID in the file meta group")
            if syntax in _FOR_PYDICOM:
                raise UnsupportedEncodingError(path, f"transfer syntax {syntax}")
            found = _read_dataset(buf, pos, syntax != _IMPLICIT_LE, path)
    except (IsADirectoryError, PermissionError, FileNotFoundError) as exc:
        raise UnreadableFileError(path, f"cannot read it: {exc.strerror or exc}") from exc
    except OSError as exc:
        raise UnreadableFileError(path, f"cannot read it: {exc}") from exc
    return Header(path, _decode(found, path), "fast")


def _read_meta(buf: _Buffer, path: str) -> tuple[str | None, int]:
    """Parse the file meta group (always Explicit VR LE); return (TransferSyntaxUID, end offset)."""
    pos, syntax = 132, None
    data = buf.data
    while buf.has(pos + 8):
        group, element = _TAG.unpack_from(data, pos)
        if group != 0x0002:
            break
        vr = bytes(data[pos + 4:pos + 6])
        if not (vr.isalpha() and vr.isupper()):
            raise UnsupportedEncodingError(path, "file meta group is not Explicit VR Little Endian")
        if vr in _LONG_VRS:
            if not buf.has(pos + 12):
                break
            length, pos = _U32.unpack_from(data, pos + 8)[0], pos + 12
        else:
            length, pos = _U16.unpack_from(data, pos + 6)[0], pos + 8
        if length == _UNDEFINED or not buf.has(pos + length):
            raise MalformedDicomError(path, f"file meta element ({group:04X},{element:04X}) is truncated")
        if (group << 16 | element) == _TRANSFER_SYNTAX:
            syntax = bytes(data[pos:pos + length]).decode("latin_1").strip("\x00 ")
        pos += length
    return syntax, pos


def _element_header(buf: _Buffer, pos: int, explicit: bool, path: str) -> tuple[int, bytes, int, int]:
    """Parse the element header at `pos`: (tag, VR or b"", value length, value offset)."""
    data = buf.data
    group, element = _TAG.unpack_from(data, pos)
    tag = group << 16 | element
    if group == 0xFFFE:  # item and delimiters carry no VR in either encoding
        return tag, b"", _U32.unpack_from(data, pos + 4)[0], pos + 8
    if not explicit:
        return tag, b"", _U32.unpack_from(data, pos + 4)[0], pos + 8
    vr = bytes(data[pos + 4:pos + 6])
    if vr in _LONG_VRS:
        if not buf.has(pos + 12):
            raise MalformedDicomError(path, f"truncated at byte {pos} (element ({group:04X},{element:04X}))")
        return tag, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
    if not (vr.isalpha() and vr.isupper()):
        raise MalformedDicomError(path, f"element ({group:04X},{element:04X}) at byte {pos} has no valid VR")
    return tag, vr, _U16.unpack_from(data, pos + 6)[0], pos + 8


def _read_dataset(buf: _Buffer, pos: int, explicit: bool, path: str) -> dict[int, bytes]:
    """Collect the raw values of `TAGS` from the top-level data set starting at `pos`."""
    found: dict[int, bytes] = {}
    while True:
        if not buf.has(pos + 8):
            if pos >= len(buf.data):
                return found  # a data set may simply end (no pixel data)
            raise MalformedDicomError(path, f"truncated at byte {pos} (element header)")
        group, element = _TAG.unpack_from(buf.data, pos)
        if (group << 16 | element) > _LAST_TAG:
            return found  # tags ascend: nothing needed beyond this point is parsed, even its VR
        tag, vr, length, pos = _element_header(buf, pos, explicit, path)
        if length == _UNDEFINED:
            # A sequence (or UN of undefined length, whose content is Implicit VR LE).
            pos = _skip_sequence(buf, pos, explicit and vr != b"UN", path)
            continue
        if tag in TAGS:
            if not buf.has(pos + length):
                raise MalformedDicomError(path, f"value of {TAGS[tag][0]} is truncated")
            found[tag] = bytes(buf.data[pos:pos + length])
        pos += length


def _skip_sequence(buf: _Buffer, pos: int, explicit: bool, path: str) -> int:
    """Skip the items of an undefined-length sequence; return the offset after its delimiter."""
    while True:
        if not buf.has(pos + 8):
            raise MalformedDicomError(path, f"truncated at byte {pos} (inside a sequence)")
        tag, _, length, pos = _element_header(buf, pos, False, path)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise MalformedDicomError(path, f"unexpected tag {tag >> 16:04X},{tag & 0xFFFF:04X} in a sequence")
        pos = _skip_item(buf, pos, explicit, path) if length == _UNDEFINED else pos + length


def _skip_item(buf: _Buffer, pos: int, explicit: bool, path: str) -> int:
    """Skip the elements of an undefined-length item; return the offset after its delimiter."""
    while True:
        if not buf.has(pos + 8):
            raise MalformedDicomError(path, f"truncated at byte {pos} (inside a sequence item)")
        tag, vr, length, pos = _element_header(buf, pos, explicit, path)
        if tag == _ITEM_END:
            return pos
        if length == _UNDEFINED:
            pos = _skip_sequence(buf, pos, explicit and vr != b"UN", path)
        else:
            pos += length


def _decode(found: Mapping[int, bytes], path: str) -> dict[str, str]:
    """Decode raw values: text VRs with the file's character set, the others as ASCII/latin-1."""
    charset = found.get(0x00080005, b"").decode("latin_1").replace("\x00", "").strip()
    codec = _CODECS.get(charset)
    if codec is None:  # code extensions (ISO 2022), several terms, or an unknown term
        raise UnsupportedEncodingError(path, f"character set {charset!r}")
    values = {}
    for tag, raw in found.items():
        keyword, is_text = TAGS[tag]
        values[keyword] = raw.decode(codec if is_text else "latin_1", errors="replace")
    return values


def read_header_pydicom(path: str) -> Header:
    """Read `TAGS` with pydicom (any transfer syntax and character set pydicom supports).

    Raises:
        UnreadableFileError, NotDicomError, MalformedDicomError: as `read_header`.
    """
    import zlib

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(TAG_OF.values()))
        values = {}
        for tag, (keyword, _) in TAGS.items():
            if tag in ds:
                values[keyword] = _pydicom_text(ds[tag].value)
    except (IsADirectoryError, PermissionError, FileNotFoundError) as exc:
        raise UnreadableFileError(path, f"cannot read it: {exc.strerror or exc}") from exc
    except InvalidDicomError as exc:
        raise NotDicomError(path, f"not a DICOM file ({exc})") from exc
    except (OSError, EOFError, ValueError, LookupError, struct.error, zlib.error, NotImplementedError,
            TypeError, AttributeError) as exc:
        # pydicom reports a bad file through any of these; all mean "cannot parse this header".
        raise MalformedDicomError(path, f"cannot parse the DICOM header: {exc}") from exc
    return Header(path, values, "pydicom")


def _pydicom_text(value: object) -> str:
    """A pydicom value as the string the fast reader would give (multi-values joined by ``\\``)."""
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("latin_1")
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)  # str, PersonName, IS, DSfloat, ...: the value as written
