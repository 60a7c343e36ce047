"""A minimal DICOM Part 10 header reader, standard library only, for the hot paths.

Two places need a handful of top-level tags faster than pydicom gives them: the repack
command, started once per file (``import pydicom`` alone costs 150-300 ms there), and the
Orthanc plugin, which runs in Orthanc's embedded Python (no pydicom at all) and reads the
headers of every received instance. This module parses the file meta group and the
top-level data set for the two encodings nearly every file uses — Explicit VR Little
Endian (also every encapsulated syntax, whose data set is Explicit VR LE) and Implicit VR
Little Endian — reading only up to the last wanted tag and skipping everything else
(sequences of defined or undefined length included). Anything else — Explicit VR Big
Endian, deflated data sets, character sets with code extensions (ISO 2022) — raises
`HeaderError` with kind ``"unsupported"``, and the caller uses a full parser instead.

`orthanc_values` turns the raw values into the strings of Orthanc's simplified JSON (as
Orthanc 1.10 and its DCMTK make them, checked tag by tag against a real Orthanc by
tests/test_dicomheader_orthanc.py); `decode` gives them as pydicom reads them (the repack).

It must keep importing nothing outside the standard library (the plugin imports it).
"""

from __future__ import annotations

import codecs
import struct
import sys
from collections.abc import Callable, Container, Mapping

#: DICOM keyword -> (tag, whether its value is text decoded with the character set).
#: The tags the built-in services and the plugin's default header list read.
KEYWORDS: dict[str, tuple[int, bool]] = {
    "SpecificCharacterSet": (0x00080005, False),
    "ImageType": (0x00080008, False),
    "SOPClassUID": (0x00080016, False),
    "SOPInstanceUID": (0x00080018, False),
    "StudyDate": (0x00080020, False),
    "SeriesDate": (0x00080021, False),
    "StudyTime": (0x00080030, False),
    "SeriesTime": (0x00080031, False),
    "AccessionNumber": (0x00080050, True),
    "Modality": (0x00080060, False),
    "Manufacturer": (0x00080070, True),
    "InstitutionName": (0x00080080, True),
    "ReferringPhysicianName": (0x00080090, True),
    "StationName": (0x00081010, True),
    "StudyDescription": (0x00081030, True),
    "SeriesDescription": (0x0008103E, True),
    "PatientName": (0x00100010, True),
    "PatientID": (0x00100020, True),
    "PatientBirthDate": (0x00100030, False),
    "PatientSex": (0x00100040, False),
    "PatientAge": (0x00101010, False),
    "BodyPartExamined": (0x00180015, False),
    "ProtocolName": (0x00181030, True),
    "StudyInstanceUID": (0x0020000D, False),
    "SeriesInstanceUID": (0x0020000E, False),
    "StudyID": (0x00200010, True),
    "SeriesNumber": (0x00200011, False),
    "AcquisitionNumber": (0x00200012, False),
    "InstanceNumber": (0x00200013, False),
    "NumberOfStudyRelatedInstances": (0x00201208, False),
    "NumberOfSeriesRelatedInstances": (0x00201209, False),
    "NumberOfFrames": (0x00280008, False),
    "Rows": (0x00280010, False),
    "Columns": (0x00280011, False),
    "PerformedStationAETitle": (0x00400241, False),
}

#: Binary values (VR US) among them, decoded to decimal strings as Orthanc's JSON has them.
BINARY = {0x00280010: struct.Struct("<H"), 0x00280011: struct.Struct("<H")}

#: The dictionary's VR of each tag of `KEYWORDS`: how Orthanc (DCMTK) reads it in Implicit VR,
#: and what Explicit VR files normally give.
VRS: dict[int, bytes] = {
    0x00080005: b"CS", 0x00080008: b"CS", 0x00080016: b"UI", 0x00080018: b"UI", 0x00080020: b"DA",
    0x00080021: b"DA", 0x00080030: b"TM", 0x00080031: b"TM", 0x00080050: b"SH", 0x00080060: b"CS",
    0x00080070: b"LO", 0x00080080: b"LO", 0x00080090: b"PN", 0x00081010: b"SH", 0x00081030: b"LO",
    0x0008103E: b"LO", 0x00100010: b"PN", 0x00100020: b"LO", 0x00100030: b"DA", 0x00100040: b"CS",
    0x00101010: b"AS", 0x00180015: b"CS", 0x00181030: b"LO", 0x0020000D: b"UI", 0x0020000E: b"UI",
    0x00200010: b"SH", 0x00200011: b"IS", 0x00200012: b"IS", 0x00200013: b"IS", 0x00201208: b"IS",
    0x00201209: b"IS", 0x00280008: b"IS", 0x00280010: b"US", 0x00280011: b"US", 0x00400241: b"AE",
}

#: Explicit VR Big Endian, Deflated Explicit VR LE, JPIP Referenced Deflate: not read here.
UNSUPPORTED_SYNTAXES = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})
IMPLICIT_LE = "1.2.840.10008.1.2"

#: Defined Terms of (0008,0005) without code extensions -> Python codec.
CODECS = {
    "": "latin_1",  # no character set: the default repertoire, read as latin-1 (a superset of ASCII)
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


def _ascii_only(raw: bytes) -> str:
    """Orthanc's `Toolbox::ConvertToAscii`: printable ASCII and LF, nothing else."""
    return str(raw.translate(None, _NOT_ASCII), "ascii")


def _utf8_as_boost(raw: bytes) -> str:
    """Invalid UTF-8 skipped as Orthanc's ``boost::locale::conv::utf_to_utf(..., skip)`` does.

    boost decodes a sequence from its lead byte: a byte that cannot start one is dropped; else
    it takes the continuation bytes the lead announces, and drops them all with the lead at the
    first byte that is not one (that byte included), at the end of the value, or when the code
    point is invalid (overlong, surrogate, beyond U+10FFFF). Valid runs decode as usual.
    """
    out, pos, size = [], 0, len(raw)
    while pos < size:
        try:
            out.append(str(raw[pos:], "utf_8"))
            break
        except UnicodeDecodeError as bad:
            out.append(str(raw[pos:pos + bad.start], "utf_8"))
            pos += bad.start
        lead = raw[pos]
        pos += 1
        trail = 1 if 0xC2 <= lead <= 0xDF else 2 if 0xE0 <= lead <= 0xEF else 3 if 0xF0 <= lead <= 0xF4 else 0
        for _ in range(trail):
            if pos >= size:
                break
            pos += 1
            if raw[pos - 1] & 0xC0 != 0x80:
                break
    return "".join(out)


def _single_byte_table(codec: str, undefined: bytes = b"") -> str:
    """A `codecs.charmap_decode` table of a single-byte codec ('\ufffe': undefined)."""
    return "".join("\ufffe" if byte in undefined else str(bytes((byte,)), codec, "replace").replace("\ufffd", "\ufffe")
                   for byte in range(256))


#: Orthanc (glibc's TIS-620) has nothing at 0x80-0xA0, where Python's codec has C1 controls.
_TIS_620 = _single_byte_table("tis_620", bytes(range(0x80, 0xA1)))
#: JIS X 0201 as Orthanc reads ISO_IR 13 (glibc's SHIFT-JIS): yen sign at 0x5C, overline at 0x7E,
#: half-width katakana at 0xA1-0xDF. Other 8-bit bytes start Shift-JIS double bytes there.
_JIS_X_0201 = "".join("\u00a5" if b == 0x5C else "\u203e" if b == 0x7E else chr(b) if b < 0x80
                      else chr(0xFF61 + b - 0xA1) if 0xA1 <= b <= 0xDF else "\ufffe" for b in range(256))
#: What `_ascii_only` removes.
_NOT_ASCII = bytes(b for b in range(256) if not (b == 0x0A or 0x20 <= b <= 0x7E))
#: What DCMTK removes anywhere in a UID (C's isspace).
_WHITESPACE = b" \t\n\v\f\r"


def _skipping(codec: str) -> Callable[[bytes], str]:
    """Orthanc's iconv conversion with "skip": a byte the character set does not define is dropped."""
    return lambda raw: str(raw, codec, "ignore")


def _charmap(table: str) -> Callable[[bytes], str]:
    return lambda raw: codecs.charmap_decode(raw, "ignore", table)[0]


def _jis_x_0201(raw: bytes) -> str:
    try:
        return codecs.charmap_decode(raw, "strict", _JIS_X_0201)[0]
    except UnicodeDecodeError:
        raise HeaderError("unsupported", "ISO_IR 13 value with Shift-JIS double bytes") from None


def _left_to_orthanc(raw: bytes) -> str:
    raise HeaderError("unsupported", "a value this reader does not convert as Orthanc does")


#: Defined Terms of (0008,0005) without code extensions -> how Orthanc 1.10 converts a value to
#: UTF-8: (Python codec tried first, strict, or None; the conversion when it fails or is None).
#: No term is Orthanc's "DefaultEncoding" (Latin1 unless configured). Not here (left to Orthanc):
#: terms Orthanc 1.10 does not know (it then keeps ASCII only, e.g. ISO_IR 203 — a later Orthanc
#: may know them), code extensions.
ORTHANC_CHARSETS: dict[str, tuple[str | None, Callable[[bytes], str]]] = {
    "": ("latin_1", _left_to_orthanc),
    "ISO_IR 100": ("latin_1", _left_to_orthanc),
    "ISO_IR 192": ("utf_8", _utf8_as_boost),
    "ISO_IR 6": (None, _ascii_only),  # Orthanc reads it as ASCII, not UTF-8 nor Latin-1
    "ISO_IR 13": (None, _jis_x_0201),
    "ISO_IR 166": (None, _charmap(_TIS_620)),
    "GB18030": ("gb18030", _left_to_orthanc),
    "GBK": ("gbk", _left_to_orthanc),
    **{term: (codec, _skipping(codec)) for term, codec in (
        ("ISO_IR 101", "iso8859_2"), ("ISO_IR 109", "iso8859_3"), ("ISO_IR 110", "iso8859_4"),
        ("ISO_IR 144", "iso8859_5"), ("ISO_IR 127", "iso8859_6"), ("ISO_IR 126", "iso8859_7"),
        ("ISO_IR 138", "iso8859_8"), ("ISO_IR 148", "iso8859_9"))},
}
#: String VRs DCMTK reads with their trailing spaces removed (UI: every space; UN: as is).
_PADDED_VRS = frozenset({b"AE", b"AS", b"CS", b"DA", b"DS", b"DT", b"IS", b"LO", b"LT", b"PN", b"SH", b"ST",
                         b"TM", b"UC", b"UR", b"UT"})
_US = struct.Struct("<H")

_CHUNK = 32768
#: Deeper nesting of sequences than any real file has: treated as malformed (no recursion error).
_MAX_DEPTH = 64
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_TRANSFER_SYNTAX = 0x00020010
_CHARSET = 0x00080005
#: VRs whose explicit encoding has 2 reserved bytes and a 4-byte length.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                       b"UT", b"UV"})
#: Every other pair of upper-case ASCII letters: a VR with a 2-byte length (unknown ones included).
#: One set lookup instead of ``vr.isalpha() and vr.isupper()`` (two calls) on every element.
_SHORT_VRS = frozenset(bytes((a, b)) for a in range(ord("A"), ord("Z") + 1)
                       for b in range(ord("A"), ord("Z") + 1)) - _LONG_VRS
#: An element header as Explicit VR LE writes most of them: group, element, VR, 2-byte length.
#: One `unpack_from` call reads it all, VR as bytes whatever the buffer type.
_EXPLICIT = struct.Struct("<HH2sH")
#: An element header in Implicit VR LE: group, element, 4-byte length.
_IMPLICIT = struct.Struct("<HHI")
_U32 = struct.Struct("<I")

#: What the parser reads: the whole file (any bytes-like object) or a bytearray of its start.
_Data = bytes | bytearray | memoryview


class HeaderError(ValueError):
    """The header cannot be read here.

    Attributes:
        kind: ``"not-dicom"`` (no DICM marker), ``"malformed"`` (truncated, inconsistent) or
            ``"unsupported"`` (an encoding this reader leaves to a full parser).
        reason: what is wrong, in words.
    """

    def __init__(self, kind: str, reason: str):
        self.kind = kind
        self.reason = reason
        super().__init__(reason)


class Incomplete(Exception):
    """The parser reached the end of a partial read: bytes up to `end` are needed to go on.

    Raised by `read_start` only; `read_elements` reads on by itself.
    """

    def __init__(self, end: int):
        self.end = end
        super().__init__(end)


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


def read_elements(source, tags: Container[int], last_tag: int,
                  vrs: dict[int, bytes] | None = None) -> tuple[str, dict[int, bytes]]:
    """The raw values of `tags` in the top-level data set of a Part 10 file.

    Args:
        source: a binary file object (read as far as needed) or the whole file as bytes.
        tags: the tags wanted; (0008,0005) is always collected for `decode` and `orthanc_values`.
        last_tag: the highest tag wanted: parsing stops there.
        vrs: if given, filled with the VR of each value found (b"" in Implicit VR), for
            `orthanc_values`.

    Returns:
        The transfer syntax UID and ``{tag: raw value bytes}`` of the tags present.

    Raises:
        HeaderError: not DICOM, malformed, or an encoding this reader does not handle.
    """
    vrs = {} if vrs is None else vrs
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _parse(source, True, tags, last_tag, vrs)
    return _parse_file(source, tags, last_tag, vrs)


def read_start(data: _Data, complete: bool, tags: Container[int], last_tag: int,
               vrs: dict[int, bytes] | None = None) -> tuple[str, dict[int, bytes]]:
    """`read_elements` on the first bytes of a file (all of it when `complete`).

    Raises:
        Incomplete: the header goes on past `data` (its `end`: the bytes needed to go on).
        HeaderError: as `read_elements`.
    """
    return _parse(data, complete, tags, last_tag, {} if vrs is None else vrs)


def decode(found: Mapping[int, bytes], text_tags: Container[int]) -> dict[int, str]:
    """Decode raw values: `text_tags` with the file's character set, `BINARY` ones as numbers,
    the others as latin-1 (multi-values joined with a backslash, as written).

    Padding is kept (callers trim). Raises HeaderError("unsupported") for character sets
    with code extensions, several terms, or an unknown term.
    """
    charset = found.get(_CHARSET, b"").decode("latin_1").replace("\x00", "").strip()
    codec = CODECS.get(charset)
    if codec is None:
        raise HeaderError("unsupported", f"character set {charset!r}")
    values = {}
    for tag, raw in found.items():
        fmt = BINARY.get(tag)
        if fmt is None:
            # str(raw, ...) is raw.decode(...) for any bytes-like raw, without copying it to bytes first.
            values[tag] = str(raw, codec if tag in text_tags else "latin_1", "replace")
        else:
            usable = len(raw) - len(raw) % fmt.size
            values[tag] = "\\".join(str(v[0]) for v in fmt.iter_unpack(bytes(raw[:usable])))
    return values


def orthanc_values(found: Mapping[int, bytes], vrs: Mapping[int, bytes] | None, max_string_length: int,
                   names: Mapping[int, str] | None = None) -> dict:
    """The values as Orthanc's simplified JSON has them (Orthanc 1.10 with DCMTK 3.6.7).

    Orthanc takes DCMTK's string, which has lost its trailing spaces (a UID: every space) and
    ends at its first NUL, converts it to UTF-8 with the character set (skipping what does not
    convert), and gives null for a value longer than `max_string_length` UTF-8 bytes (0: no
    limit). Leading spaces stay. A public tag encoded as UN is read by the dictionary's VR,
    padding and NULs kept but for one trailing NUL. US values are decimal numbers (empty: null).

    Args:
        found: raw values, as `read_elements` gives them.
        vrs: the VR of each as `read_elements` gives them (None, or b"": the dictionary's, `VRS`).
        names: the keys of the result, by tag (other tags are left out); None: every tag, by tag.

    Returns:
        The values: strings, or None (null).

    Raises:
        HeaderError("unsupported"): a character set, value or VR this does not convert as
            Orthanc does (the caller asks Orthanc).
    """
    raw = found.get(_CHARSET, b"")
    charset = str(raw[:raw.index(0)] if 0 in raw else raw, "latin_1").strip().upper()
    convert = ORTHANC_CHARSETS.get(charset)
    if convert is None:
        raise HeaderError("unsupported", f"character set {charset!r}")
    codec, fallback = convert
    vr_of, padded = (vrs or {}).get, _PADDED_VRS
    name_of = (names if names is not None else {tag: tag for tag in found}).get
    limit = max_string_length or sys.maxsize
    # A value of at most limit/3 bytes cannot exceed `limit` UTF-8 bytes (3 per byte at most).
    short = limit // 3
    values: dict = {}
    # The loop runs for every value of every instance: `0 in raw`, not `b"\0" in raw` (5x slower).
    for tag, raw in found.items():
        name = name_of(tag)
        if name is None:
            continue
        vr = vr_of(tag) or VRS.get(tag)
        if vr in padded:
            raw = raw.rstrip(b" ")
            if 0 in raw:
                raw = raw[:raw.index(0)]
        elif vr == b"UI":
            raw = raw.translate(None, _WHITESPACE)
            if 0 in raw:
                raw = raw[:raw.index(0)]
        elif vr == b"US":
            values[name] = _orthanc_numbers(raw, tag)
            continue
        elif vr == b"UN" and tag in VRS:
            if VRS[tag] == b"US":  # binary to Orthanc: null in its simplified JSON
                values[name] = None
                continue
            if raw[-1:] == b"\0" and not len(raw) % 2:
                raw = raw[:-1]
        else:
            raise HeaderError("unsupported", f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has VR {vr!r}")
        if codec is None:
            if fallback is _ascii_only:  # ISO_IR 6, inline: 8-bit bytes dropped, then any control character?
                text = str(raw, "ascii", "ignore")
                if not text.isprintable():
                    text = _ascii_only(raw)
            else:
                text = fallback(raw)
        else:
            try:
                text = str(raw, codec)
            except UnicodeDecodeError:
                text = fallback(raw)
        values[name] = None if len(raw) > short and len(text.encode()) > limit else text
    return values


def _orthanc_numbers(raw: bytes, tag: int) -> str | None:
    """A US value as Orthanc gives it: its numbers joined with a backslash, null when empty."""
    if not raw:
        return None
    if len(raw) % 2:
        raise HeaderError("unsupported", f"({tag >> 16:04X},{tag & 0xFFFF:04X}) has an odd length")
    return "\\".join(str(v[0]) for v in _US.iter_unpack(raw))


def _parse_file(file, tags: Container[int], last_tag: int, vrs: dict[int, bytes]) -> tuple[str, dict[int, bytes]]:
    """`read_elements` from a file object: parse what is read so far, read more when the parser asks.

    The parser starts over on each read rather than resuming (one parser, no saved state). Most
    headers fit the first chunk; a longer one (Siemens CSA headers) costs one more parse of the
    part already read (~30 µs), and each retry at least doubles the bytes read, so the parsing
    repeated stays below about one more parse of the whole header.
    """
    buf = _Buffer(file)
    while True:
        try:
            return _parse(buf.data, buf.eof, tags, last_tag, vrs)
        except Incomplete as need:
            buf.has(max(need.end, 2 * len(buf.data)))


def _parse(data: _Data, complete: bool, tags: Container[int], last_tag: int,
           vrs: dict[int, bytes]) -> tuple[str, dict[int, bytes]]:
    """`read_elements` on the bytes of a file: all of it (`complete`) or its start (may raise Incomplete)."""
    if len(data) < 132:
        _read_more(complete, 132)
    if len(data) < 132 or data[128:132] != b"DICM":
        raise HeaderError("not-dicom", "not a DICOM file (no 'DICM' marker after the 128-byte preamble)")
    syntax, pos = _read_meta(data, complete)
    if syntax is None:
        raise HeaderError("unsupported", "no TransferSyntaxUID in the file meta group")
    if syntax in UNSUPPORTED_SYNTAXES:
        raise HeaderError("unsupported", f"transfer syntax {syntax}")
    return syntax, _read_dataset(data, complete, pos, syntax != IMPLICIT_LE, tags, max(last_tag, _CHARSET), vrs)


def _read_more(complete: bool, end: int) -> None:
    """Called where `data` ends before `end`: ask for more unless it is the whole file.

    Returns only when `data` is complete (the caller then handles the end of the file); with
    a partial read, raises Incomplete instead. Every bounds check in the parser goes through
    here, so a parse of a partial read either asks for more or gives the same answer as a
    parse of the whole file.
    """
    if not complete:
        raise Incomplete(end)


def _read_meta(data: _Data, complete: bool) -> tuple[str | None, int]:
    """Parse the file meta group (always Explicit VR LE); return (TransferSyntaxUID, end offset)."""
    pos, syntax, size = 132, None, len(data)
    while True:
        if pos + 8 > size:
            _read_more(complete, pos + 8)
            break
        group, element, vr, length = _EXPLICIT.unpack_from(data, pos)
        if group != 0x0002:
            break
        if vr in _LONG_VRS:
            if pos + 12 > size:
                _read_more(complete, pos + 12)
                break
            length, pos = _U32.unpack_from(data, pos + 8)[0], pos + 12
        elif vr in _SHORT_VRS:
            pos += 8
        else:
            raise HeaderError("unsupported", "file meta group is not Explicit VR Little Endian")
        if length == _UNDEFINED or pos + length > size:
            if length != _UNDEFINED:  # (undefined is malformed whatever follows: nothing to read)
                _read_more(complete, pos + length)
            raise HeaderError("malformed", f"file meta element ({group:04X},{element:04X}) is truncated")
        if (group << 16 | element) == _TRANSFER_SYNTAX:
            syntax = bytes(data[pos:pos + length]).decode("latin_1").strip("\x00 ")
        pos += length
    return syntax, pos


def _read_dataset(data: _Data, complete: bool, pos: int, explicit: bool, tags: Container[int],
                  last: int, vrs: dict[int, bytes]) -> dict[int, bytes]:
    """Collect the raw values of `tags` (and the character set) from the top-level data set, and
    their VRs into `vrs` (b"" in Implicit VR).

    The hot loop (the plugin runs it on every received instance): the common element headers —
    Implicit VR, and Explicit VR with a 2-byte length — are decoded inline with one struct call
    and no function call; the others go through `_element_header`.
    """
    found: dict[int, bytes] = {}
    size = len(data)
    while True:
        if pos + 8 > size:
            _read_more(complete, pos + 8)
            if pos >= size:
                return found  # a data set may simply end (no pixel data)
            raise HeaderError("malformed", f"truncated at byte {pos} (element header)")
        if explicit:
            group, element, vr, length = _EXPLICIT.unpack_from(data, pos)
        else:
            group, element, length = _IMPLICIT.unpack_from(data, pos)
            vr = b""
        tag = group << 16 | element
        if tag > last:
            return found  # tags ascend: nothing needed beyond this point is parsed, even its VR
        if explicit and (vr not in _SHORT_VRS or group == 0xFFFE):
            # A 4-byte length (OB, SQ, UN...), an item or delimiter (no VR), or no valid VR.
            tag, vr, length, value = _element_header(data, complete, pos, explicit)
        else:
            value = pos + 8
        if length == _UNDEFINED:
            # A sequence (or UN of undefined length, whose content is Implicit VR LE).
            pos = _skip_sequence(data, complete, value, explicit and vr != b"UN", 1)
            continue
        pos = value + length
        if tag in tags or tag == _CHARSET:
            if pos > size:
                _read_more(complete, pos)
                raise HeaderError("malformed", f"value of ({group:04X},{element:04X}) is truncated")
            found[tag] = bytes(data[value:pos])
            vrs[tag] = vr


def _element_header(data: _Data, complete: bool, pos: int, explicit: bool) -> tuple[int, bytes, int, int]:
    """Parse the element header at `pos` (8 bytes there): (tag, VR or b"", value length, value offset)."""
    group, element, vr, length = _EXPLICIT.unpack_from(data, pos)
    tag = group << 16 | element
    if group == 0xFFFE or not explicit:  # items and delimiters carry no VR in either encoding
        return tag, b"", _U32.unpack_from(data, pos + 4)[0], pos + 8
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            _read_more(complete, pos + 12)
            raise HeaderError("malformed", f"truncated at byte {pos} (element ({group:04X},{element:04X}))")
        return tag, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
    if vr not in _SHORT_VRS:
        raise HeaderError("malformed", f"element ({group:04X},{element:04X}) at byte {pos} has no valid VR")
    return tag, vr, length, pos + 8


def _skip_sequence(data: _Data, complete: bool, pos: int, explicit: bool, depth: int) -> int:
    """Skip the items of an undefined-length sequence; return the offset after its delimiter."""
    if depth > _MAX_DEPTH:
        raise HeaderError("malformed", f"sequences nested more than {_MAX_DEPTH} deep at byte {pos}")
    while True:
        if pos + 8 > len(data):
            _read_more(complete, pos + 8)
            raise HeaderError("malformed", f"truncated at byte {pos} (inside a sequence)")
        tag, _, length, pos = _element_header(data, complete, pos, False)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise HeaderError("malformed", f"unexpected tag {tag >> 16:04X},{tag & 0xFFFF:04X} in a sequence")
        pos = _skip_item(data, complete, pos, explicit, depth) if length == _UNDEFINED else pos + length


def _skip_item(data: _Data, complete: bool, pos: int, explicit: bool, depth: int) -> int:
    """Skip the elements of an undefined-length item; return the offset after its delimiter."""
    while True:
        if pos + 8 > len(data):
            _read_more(complete, pos + 8)
            raise HeaderError("malformed", f"truncated at byte {pos} (inside a sequence item)")
        tag, vr, length, pos = _element_header(data, complete, pos, explicit)
        if tag == _ITEM_END:
            return pos
        if length == _UNDEFINED:
            pos = _skip_sequence(data, complete, pos, explicit and vr != b"UN", depth + 1)
        else:
            pos += length
