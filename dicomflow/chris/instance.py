"""Reading the tags the ChRIS services need from a DICOM file, as strings for `dicomtags`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicomflow.chris.errors import StorageWriteError

#: Every tag the storage path, the registration fields and the progress counters read.
KEYWORDS = (
    "SpecificCharacterSet",
    "PatientID", "PatientName", "PatientBirthDate", "PatientAge", "PatientSex",
    "StudyInstanceUID", "StudyDescription", "AccessionNumber", "StudyDate",
    "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "ProtocolName",
    "SOPInstanceUID", "InstanceNumber", "NumberOfSeriesRelatedInstances",
)


def _as_text(value: Any) -> Any:
    """An element value as read: str for single values, a list for multi-values, None when empty."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_as_text(v) for v in value]
    # IS/DS keep the string they were read from; PersonName prints as written.
    original = getattr(value, "original_string", None)
    if isinstance(original, str):
        return original
    return str(value)


def read_instance_tags(path: Path | str) -> dict[str, Any]:
    """The values of `KEYWORDS` present in the file's header (pixel data is not read).

    Raises:
        StorageWriteError: the file is not DICOM or cannot be read.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(KEYWORDS))
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise StorageWriteError(f"cannot read DICOM file {path}: {exc}") from exc
    tags: dict[str, Any] = {}
    for keyword in KEYWORDS:
        element = ds.get(keyword)
        if element is not None:
            tags[keyword] = _as_text(element)
    return tags
