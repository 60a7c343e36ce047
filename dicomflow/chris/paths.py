"""The storage path of an instance in CUBE's storage (cube.md section 1), as oxidicom writes it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dicomflow.dicomtags import clean_value, hash7, pad_number, sanitize
from dicomflow.errors import MissingTagError

#: Without these an instance is not stored (cube.md section 1).
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID", "StudyDate")
#: Missing -> the empty string.
EMPTY_WHEN_MISSING = ("PatientName", "PatientBirthDate")
#: Missing -> the tag's own name.
NAME_WHEN_MISSING = ("StudyDescription", "AccessionNumber", "SeriesDescription", "SeriesNumber",
                     "InstanceNumber")
ROOT = "SERVICES/PACS"


@dataclass(frozen=True)
class InstancePath:
    """Where one instance lives in CUBE's storage, relative to CHRIS_FILES_ROOT."""

    pacs_name: str
    series_folder: str
    file_name: str

    @property
    def path(self) -> str:
        """The file's storage path (what CUBE 5's pacsfiles API registers)."""
        return f"{self.series_folder}/{self.file_name}"


def required(tags: Mapping[str, Any], keyword: str) -> str:
    """The clean value of a required tag.

    Raises:
        MissingTagError: the tag is absent, empty or multi-valued.
    """
    value = clean_value(tags.get(keyword))
    if value is None:
        raise MissingTagError(keyword)
    return value


def _placeholder(tags: Mapping[str, Any], keyword: str) -> str:
    value = clean_value(tags.get(keyword))
    if value is not None:
        return value
    return "" if keyword in EMPTY_WHEN_MISSING else keyword


def _number(tags: Mapping[str, Any], keyword: str, width: int) -> str:
    """SeriesNumber/InstanceNumber: not sanitised (cube.md), but a `/` never makes a sub-folder."""
    return pad_number(_placeholder(tags, keyword), width).replace("/", "_")


def pacs_component(pacs_name: str) -> str:
    """The PACS name as used in the path and in `pacs_name` (sanitised so both agree)."""
    return sanitize(pacs_name.strip())


def instance_path(tags: Mapping[str, Any], pacs_name: str) -> InstancePath:
    """Compute the storage path of an instance from its tags.

    Raises:
        MissingTagError: a required tag (REQUIRED) is missing; the error names it.
    """
    for keyword in REQUIRED:
        required(tags, keyword)
    pacs = pacs_component(pacs_name)
    patient = "-".join(sanitize(_placeholder(tags, k))
                       for k in ("PatientID", "PatientName", "PatientBirthDate"))
    study = "-".join(sanitize(_placeholder(tags, k))
                     for k in ("StudyDescription", "AccessionNumber", "StudyDate"))
    series_uid = required(tags, "SeriesInstanceUID")
    series = "-".join((_number(tags, "SeriesNumber", 5),
                       sanitize(_placeholder(tags, "SeriesDescription")), hash7(series_uid)))
    file_name = (f"{_number(tags, 'InstanceNumber', 4)}-"
                 f"{sanitize(required(tags, 'SOPInstanceUID'))}.dcm")
    return InstancePath(pacs_name=pacs, series_folder=f"{ROOT}/{pacs}/{patient}/{study}/{series}",
                        file_name=file_name)
