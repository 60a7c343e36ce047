"""The series-meta log file (kind 2): every top-level element of the first instance, read with pydicom.

Written once per series, so pydicom's import cost (see `header`) is paid once per series,
not per file. Values are rendered as px-repack renders them: ``str()`` of pydicom's value.
"""

from __future__ import annotations

import os

from dicomflow.repack.errors import MalformedDicomError, UnreadableFileError

_PIXEL_DATA = 0x7FE00010


def dicom_dump(path: str) -> dict[str, dict[str, str]]:
    """``{Keyword: {"value": str, "label": Keyword}}`` for every element of `path` but PixelData.

    Elements without a dictionary keyword (private, unknown) are left out, as both px-repack
    and rx-repack do; keywords are sorted, as px-repack's ``Dataset.dir()``.

    Raises:
        UnreadableFileError, MalformedDicomError: the file cannot be read or parsed.
    """
    import struct
    import zlib

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        dump = {}
        for elem in ds:
            keyword = elem.keyword
            if not keyword or elem.tag == _PIXEL_DATA:
                continue
            dump[keyword] = {"value": _render(elem.value), "label": keyword}
    except OSError as exc:
        raise UnreadableFileError(path, f"cannot read it: {exc}") from exc
    except (InvalidDicomError, EOFError, ValueError, LookupError, struct.error, zlib.error,
            NotImplementedError, TypeError, AttributeError) as exc:
        # pydicom reports a bad element through any of these; all mean "cannot dump this file".
        raise MalformedDicomError(path, f"cannot parse the data set for the series meta: {exc}") from exc
    return dict(sorted(dump.items()))


def _render(value: object) -> str:
    """px-repack's rendering: ``'%s' % value`` (a list-like value as ``[a, b]``)."""
    if value is None:
        return ""
    from pydicom.multival import MultiValue

    if isinstance(value, (list, tuple, MultiValue)):
        return "[" + ", ".join(_render_item(v) for v in value) + "]"
    return str(value)


def _render_item(value: object) -> str:
    return repr(value) if isinstance(value, str) and type(value) is str else str(value)


def series_meta_document(path: str, study_uid: str, series_uid: str, series_base_dir: str) -> dict[str, object]:
    """Kind 2: ``{StudyInstanceUID: {SeriesInstanceUID, SeriesBaseDir, DICOM}}``."""
    return {study_uid: {
        "SeriesInstanceUID": series_uid,
        "SeriesBaseDir": os.path.abspath(series_base_dir),
        "DICOM": dicom_dump(path),
    }}
