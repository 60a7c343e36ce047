"""oxidicom's series marker files under the pseudo-PACS `org.fnndsc.oxidicom` (pacsfiles mode)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dicomflow.chris.paths import ROOT

MARKER_PACS = "org.fnndsc.oxidicom"
NUMBER_OF_SERIES_RELATED_INSTANCES = "NumberOfSeriesRelatedInstances"
ATTEMPTED_PUSH_COUNT = "OxidicomAttemptedPushCount"
#: The series-level fields a marker registration carries (the rest is omitted).
_CARRIED = ("PatientID", "StudyDate", "StudyInstanceUID", "SeriesInstanceUID")


def marker_path(series_folder: str, attempt: str, key: str, value: str) -> str:
    """`SERVICES/PACS/org.fnndsc.oxidicom/{series folder}/{attempt}/{KEY}={VALUE}`."""
    return f"{ROOT}/{MARKER_PACS}/{series_folder}/{attempt}/{key}={value}"


def marker_fields(series_fields: Mapping[str, Any], series_folder: str, attempt: str,
                  key: str, value: str) -> dict[str, Any]:
    """The pacsfiles registration of one marker: ProtocolName=KEY, SeriesDescription=VALUE."""
    fields = {name: series_fields[name] for name in _CARRIED}
    fields.update(pacs_name=MARKER_PACS, ProtocolName=key, SeriesDescription=value,
                  path=marker_path(series_folder, attempt, key, value))
    return fields
