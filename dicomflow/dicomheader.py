"""A minimal DICOM Part 10 header reader, standard library only, for the hot paths.

Two places need a handful of top-level tags faster than pydicom gives them: the repack
command, started once per file (``import pydicom`` alone costs 150-300 ms there), and the
Orthanc plugin, which runs in Orthanc's embedded Python (no pydicom at all) and reads the
headers of every received instance. `dicomflow.part10` parses the header (Explicit and
Implicit VR Little Endian, up to the last wanted tag; its names are re-exported here); this
module says which tags, and turns their raw values into text. Anything else — Explicit VR
Big Endian, deflated data sets, character sets with code extensions (ISO 2022) — raises
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

from dicomflow.part10 import (  # noqa: F401 - re-exported: the reader's callers import them from here
    _CHARSET,
    IMPLICIT_LE,
    UNSUPPORTED_SYNTAXES,
    HeaderError,
    Incomplete,
    read_elements,
    read_start,
)

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
