"""Parsing the header of a DICOM Part 10 file, standard library only, for the hot paths.

The parser behind `dicomflow.dicomheader` (which turns the raw values it finds into text): the
file meta group and the top-level data set for the two encodings nearly every file uses —
Explicit VR Little Endian (also every encapsulated syntax, whose data set is Explicit VR LE)
and Implicit VR Little Endian — read only up to the last wanted tag, everything else skipped
(sequences of defined or undefined length included). Anything else raises `HeaderError` with
kind ``"unsupported"``, and the caller uses a full parser instead.

It must keep importing nothing outside the standard library (the Orthanc plugin imports it).
"""

from __future__ import annotations

import struct
from collections.abc import Container

#: Explicit VR Big Endian, Deflated Explicit VR LE, JPIP Referenced Deflate: not read here.
UNSUPPORTED_SYNTAXES = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})
IMPLICIT_LE = "1.2.840.10008.1.2"

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
