"""The series-meta log file (kind 2): every element of the first instance, read with pydicom.

Written once per series, so pydicom's import cost (see `header`) is paid once per series,
not per file. Values are rendered as px-repack 3.10 renders them (``'%s' % value`` under
pydicom 2), although we run pydicom 3, whose ``str()`` of a sequence differs: pydicom 2
prints tags as ``(0008, 1150)`` with lower-case hex, a DS inside a sequence as Python's
float repr (``'1.0'`` for ``1.000000``), so sequences are rendered here by pydicom 2's
rules (`_item_str`). See ``docs/repack.md`` for what still differs.
"""

from __future__ import annotations

import os

from dicomflow.repack.errors import MalformedDicomError, UnreadableFileError

_PIXEL_DATA = 0x7FE00010
#: Values larger than this are read only when rendered (PixelData never is).
_DEFER_SIZE = 64 * 1024
# pydicom 2's DataElement and Dataset display settings (descripWidth, maxBytesToDisplay, indent_chars).
_NAME_WIDTH = 35
_MAX_DISPLAY = 16
_INDENT = "   "
#: pydicom 2's LONG_VALUE_VR: text and byte VRs whose long values print as "Array of N elements".
_LONG_VALUE_VR = frozenset({"LT", "UC", "UT", "OB", "OD", "OF", "OL", "OV", "OW", "UN",
                            "US or SS or OW", "US or SS", "US or OW", "OB or OW"})


def dicom_dump(path: str) -> dict[str, dict[str, str]]:
    """``{Keyword: {"value": str, "label": Keyword}}`` for every element of `path` but PixelData.

    As px-repack (pydicom 2's ``Dataset.dir()``): the whole data set, elements after
    PixelData included (DataSetTrailingPadding); keywords are pydicom's dictionary
    keywords, repeating groups included (Overlay*, ImageFrameOrigin: the lowest group
    present gives the value); elements without a keyword (private, unknown) are left out;
    keywords are sorted.

    Raises:
        UnreadableFileError, MalformedDicomError: the file cannot be read or parsed.
    """
    import struct
    import zlib

    import pydicom
    from pydicom.datadict import keyword_for_tag
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE)
        dump = {}
        for tag in ds.keys():  # not `for elem in ds`: that would read the deferred PixelData
            if tag == _PIXEL_DATA:
                continue
            keyword = keyword_for_tag(tag)
            if not keyword or keyword in dump:
                continue
            dump[keyword] = {"value": render(ds[tag].value), "label": keyword}
    except OSError as exc:
        raise UnreadableFileError(path, f"cannot read it: {exc}") from exc
    except (InvalidDicomError, EOFError, ValueError, LookupError, struct.error, zlib.error,
            NotImplementedError, TypeError, AttributeError) as exc:
        # pydicom reports a bad element through any of these; all mean "cannot dump this file".
        raise MalformedDicomError(path, f"cannot parse the data set for the series meta: {exc}") from exc
    return dict(sorted(dump.items()))


def render(value: object) -> str:
    """A top-level value as px-repack writes it: ``'%s' % value`` under pydicom 2 (None -> "None")."""
    from pydicom.sequence import Sequence
    from pydicom.tag import BaseTag

    if isinstance(value, Sequence):
        return "[" + "".join(_item_str(item, 0) for item in value) + "]"
    if isinstance(value, BaseTag):
        return _tag_str(value)
    if isinstance(value, (list, tuple)) or _is_multivalue(value):
        return _multivalue_str(value)
    return str(value)


def _is_multivalue(value: object) -> bool:
    from pydicom.multival import MultiValue

    return isinstance(value, MultiValue)


def _tag_str(tag: int) -> str:
    """pydicom 2's ``str(BaseTag)``: ``(0019, 100a)``."""
    return f"({tag >> 16:04x}, {tag & 0xFFFF:04x})"


def _multivalue_str(values) -> str:
    """pydicom 2's ``str(MultiValue)``: ``[a, b]``, str and bytes items in their repr."""
    from pydicom.tag import BaseTag

    if not values:
        return ""
    return "[" + ", ".join(_multivalue_item(v, BaseTag) for v in values) + "]"


def _multivalue_item(value: object, base_tag: type) -> str:
    if isinstance(value, str):
        return repr(str(value))  # str.__repr__ even for pydicom's str subclasses (UID)
    if isinstance(value, bytes):
        return repr(value)
    return _tag_str(value) if isinstance(value, base_tag) else str(value)


def _item_str(ds, indent: int) -> str:
    """pydicom 2's ``Dataset._pretty_str(indent)`` of a sequence item."""
    pad, next_pad = _INDENT * indent, _INDENT * (indent + 1)
    lines = []
    for elem in ds:
        if elem.VR == "SQ":
            lines.append(f"{pad}{_tag_str(elem.tag)}  {elem.name}  {len(elem.value)} item(s) ---- ")
            for item in elem.value:
                lines.append(_item_str(item, indent + 1))
                lines.append(next_pad + "---------")
        else:
            name = f"{elem.name[:_NAME_WIDTH]:<{_NAME_WIDTH}}"
            lines.append(f"{pad}{_tag_str(elem.tag)} {name} {elem.VR}: {_repval(elem) or ''}")
    return "\n".join(lines)


def _repval(elem) -> str:
    """pydicom 2's ``DataElement.repval``."""
    from pydicom.uid import UID

    value = elem.value
    if elem.VR in _LONG_VALUE_VR:
        try:
            length = len(value)
        except TypeError:
            pass
        else:
            if length > _MAX_DISPLAY:
                return f"Array of {length} elements"
    if elem.VM > _MAX_DISPLAY:
        return f"Array of {elem.VM} elements"
    if isinstance(value, UID):
        return value.name
    return _repr(value)


def _repr(value: object) -> str:
    """pydicom 2's ``repr()`` of an element value inside a sequence.

    Where pydicom 3 differs: a DS is its float's repr (``'1.0'``, not the string as written),
    an IS its int's (``'7'`` for ``07``), a tag ``(0008, 1150)``.
    """
    from pydicom.tag import BaseTag
    from pydicom.valuerep import IS, DSfloat, PersonName

    if isinstance(value, DSfloat):
        return f"'{float.__repr__(value)}'"
    if isinstance(value, IS):
        return f"'{int.__repr__(value)}'"
    if isinstance(value, PersonName):
        return repr("=".join(value.components))
    if isinstance(value, BaseTag):
        return _tag_str(value)
    if _is_multivalue(value):
        return _multivalue_str(value)
    return repr(value)


def series_meta_document(path: str, study_uid: str, series_uid: str, series_base_dir: str) -> dict[str, object]:
    """Kind 2: ``{StudyInstanceUID: {SeriesInstanceUID, SeriesBaseDir, DICOM}}``."""
    return {study_uid: {
        "SeriesInstanceUID": series_uid,
        "SeriesBaseDir": os.path.abspath(series_base_dir),
        "DICOM": dicom_dump(path),
    }}
