"""Reading the tags the ChRIS services need from a DICOM file, as strings for `dicomtags`.

The standard-library reader (`dicomflow.dicomheader`) first: pydicom's took ~3 ms of CPU a file,
most of it in 280 `tell()` calls per header, on the path of every instance the ChRIS service
stores (issue 23); pydicom for whatever that reader does not read.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicomflow import dicomheader
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


#: Tags every image has: without one of them, pydicom reads the file again (see below).
EXPECTED = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SeriesNumber",
            "InstanceNumber")


def _person_name(value: str) -> str:
    """A PN value without its empty trailing component groups (``Yamada^Tarou=`` is
    ``Yamada^Tarou``), as pydicom reads it: the storage path must not depend on the reader."""
    groups = value.rstrip("\x00 ").split("=")
    while len(groups) > 1 and not groups[-1].strip():
        groups.pop()
    return "=".join(groups)


#: tag -> keyword, for the fast reader; and the tags whose text the character set decodes.
_TAGS = {dicomheader.KEYWORDS[keyword][0]: keyword for keyword in KEYWORDS}
_TEXT_TAGS = frozenset(tag for tag, keyword in _TAGS.items() if dicomheader.KEYWORDS[keyword][1])
_LAST_TAG = max(_TAGS)


def read_instance_tags(path: Path | str) -> dict[str, Any]:
    """The values of `KEYWORDS` present in the file's header (pixel data is not read): a str
    each (multi-values joined by a backslash, padding kept), as `dicomtags.clean_value` takes them.

    Raises:
        StorageWriteError: the file is not DICOM or cannot be read.
    """
    try:
        with open(path, "rb") as file:
            _, found = dicomheader.read_elements(file, _TAGS, _LAST_TAG)
        tags = {_TAGS[tag]: value for tag, value in dicomheader.decode(found, _TEXT_TAGS).items() if tag in _TAGS}
        if all(keyword in tags for keyword in EXPECTED):
            if "PatientName" in tags:
                tags["PatientName"] = _person_name(tags["PatientName"])
            return tags
        # One of them missing: rare in an image, and what a corrupted tag number also looks like
        # (the fast reader stops at the first tag past the last it wants): pydicom reads on.
    except dicomheader.HeaderError:
        # Another encoding, or a header the strict reader refuses that pydicom may still read
        # (an Implicit VR data set labelled Explicit, say): pydicom decides, and words the error.
        pass
    except OSError as exc:
        raise StorageWriteError(f"cannot read DICOM file {path}: {exc}") from exc
    return read_instance_tags_pydicom(path)


def read_instance_tags_pydicom(path: Path | str) -> dict[str, Any]:
    """`read_instance_tags` with pydicom (any encoding pydicom reads); values as pydicom gives them.

    Raises:
        StorageWriteError: the file is not DICOM or cannot be read.
    """
    tags: dict[str, Any] = {}
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(KEYWORDS))
        for keyword in KEYWORDS:   # values are converted here, when first read
            element = ds.get(keyword)
            if element is not None:
                tags[keyword] = _as_text(element)
    except (InvalidDicomError, OSError, EOFError, ValueError, LookupError, struct.error, NotImplementedError) as exc:
        # pydicom's ways of saying a header is broken, truncated or of an encoding it lacks
        raise StorageWriteError(f"cannot read DICOM file {path}: {type(exc).__name__}: {exc}") from exc
    return tags
