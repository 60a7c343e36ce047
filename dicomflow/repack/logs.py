"""The pypx log files (patientData, studyData, seriesData): their paths and their JSON documents.

Shapes are px-repack's (see ``/work/shared/docs/repack.md``): every value is a string, a
missing value (absent, empty or multi-valued, the same rule as for the folder names) is
``"Not defined"``. The series-meta DICOM dump (kind 2) is built by `seriesmeta`.
"""

from __future__ import annotations

import os

from dicomflow.repack.errors import UnsafeValueError
from dicomflow.repack.header import Header
from dicomflow.repack.layout import fit_name

NOT_DEFINED = "Not defined"
#: Optional tags the log files read (a missing one is reported in the ndjson ``missing`` list).
LOG_OPTIONAL = ("PatientName", "PatientAge", "PatientSex", "PatientBirthDate", "StudyDescription",
                "StudyDate", "PerformedStationAETitle", "SeriesDescription", "SeriesNumber", "SeriesDate",
                "Modality")
SERIES_PACK: dict[str, object] = {"seriesPack": True}


def checked_name(value: str, keyword: str, path: str) -> str:
    """`value` if it can be used as (part of) a file name in the log folder.

    Raises:
        UnsafeValueError: it contains ``/`` or is ``.``/``..`` (it would leave its folder).
    """
    if "/" in value or value in (".", ".."):
        raise UnsafeValueError(path, f"{keyword} {value!r} cannot name a log file")
    return value


def _name(stem: str, suffix: str) -> str:
    """``{stem}{suffix}``, shortened by `fit_name` (keeping `suffix`) when too long for a file name."""
    return fit_name(stem + suffix, keep=suffix)


class LogPaths:
    """The six log files of one instance under a log folder.

    Names are pypx's; one that would be too long (an over-long PatientID or UID) is
    shortened by `fit_name`, keeping its ending (``.json``, ``-meta.json``, ``-img``, ...).
    `filename` (the output file's name) is short enough already (`layout.FILE_NAME_MAX`).
    """

    __slots__ = ("instance", "patient_data", "series_meta", "series_pack", "study_meta", "study_series_meta")

    def __init__(self, logdir: str, patient_id: str, study_uid: str, series_uid: str, filename: str):
        study_data = os.path.join(logdir, "studyData")
        series_data = os.path.join(logdir, "seriesData")
        self.patient_data = os.path.join(logdir, "patientData", _name(patient_id, ".json"))
        self.study_series_meta = os.path.join(study_data, _name(study_uid, "-series"),
                                              _name(series_uid, "-meta.json"))
        self.study_meta = os.path.join(study_data, _name(study_uid, "-meta.json"))
        self.series_meta = os.path.join(series_data, _name(series_uid, "-meta.json"))
        self.instance = os.path.join(series_data, _name(series_uid, "-img"), f"{filename}.json")
        self.series_pack = os.path.join(series_data, _name(series_uid, "-pack.json"))


def patient_record(header: Header, ids: dict[str, str]) -> dict[str, object]:
    """The record of kind 1 for a patient seen for the first time (empty StudyList)."""
    return {
        "PatientID": ids["PatientID"],
        "PatientName": header.log_value("PatientName"),
        "PatientAge": header.log_value("PatientAge"),
        "PatientSex": header.log_value("PatientSex"),
        "PatientBirthDate": header.log_value("PatientBirthDate"),
        "StudyList": [],
    }


def update_patient_data(current: object, header: Header, ids: dict[str, str]) -> dict[str, object]:
    """Kind 1 after this instance: `current` (the file's JSON, or None) plus its study.

    The first instance of a patient fixes the patient fields (as px-repack); later ones
    only add their StudyInstanceUID to StudyList, once, in order of arrival.
    """
    doc = dict(current) if isinstance(current, dict) else {}
    record = doc.get(ids["PatientID"])
    if not isinstance(record, dict) or not isinstance(record.get("StudyList"), list):
        record = patient_record(header, ids)
    else:
        record = {**record, "StudyList": list(record["StudyList"])}
    if ids["StudyInstanceUID"] not in record["StudyList"]:
        record["StudyList"].append(ids["StudyInstanceUID"])
    doc[ids["PatientID"]] = record
    return doc


def study_meta(header: Header, ids: dict[str, str]) -> dict[str, object]:
    """Kind 3: ``studyData/{StudyInstanceUID}-meta.json``."""
    return {ids["StudyInstanceUID"]: {
        "PatientID": ids["PatientID"],
        "StudyDescription": header.log_value("StudyDescription"),
        "StudyDate": header.log_value("StudyDate"),
        "StudyInstanceUID": ids["StudyInstanceUID"],
        "PerformedStationAETitle": header.log_value("PerformedStationAETitle"),
    }}


def _series_fields(header: Header, ids: dict[str, str]) -> dict[str, object]:
    return {
        "PatientID": ids["PatientID"],
        "StudyInstanceUID": ids["StudyInstanceUID"],
        "SeriesInstanceUID": ids["SeriesInstanceUID"],
        "SeriesDescription": header.log_value("SeriesDescription"),
        "SeriesNumber": header.log_value("SeriesNumber"),
        "SeriesDate": header.log_value("SeriesDate"),
        "Modality": header.log_value("Modality"),
    }


def series_meta(header: Header, ids: dict[str, str]) -> dict[str, object]:
    """Kind 4: ``seriesData/{SeriesInstanceUID}-meta.json`` (px-repack's shape, keyed by the UID)."""
    return {ids["SeriesInstanceUID"]: _series_fields(header, ids)}


def instance_record(header: Header, ids: dict[str, str], filename: str, fslocation: str) -> dict[str, object]:
    """Kind 5: ``seriesData/{SeriesInstanceUID}-img/{filename}.json``."""
    fields = _series_fields(header, ids)
    fields["outputFile"] = filename
    fields["imageObj"] = {filename: {"FSlocation": fslocation}}
    return {ids["SeriesInstanceUID"]: fields}
