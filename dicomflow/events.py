"""The events the Orthanc plugin sends to the scheduler, one per stored instance or stable series/study."""

from __future__ import annotations

import copy
from enum import Enum
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Level(str, Enum):
    """What an event (and a service's `triggerLevel`) is about."""

    INSTANCE = "instance"
    SERIES = "series"
    STUDY = "study"


#: The header that identifies an event of each level (its idempotency key).
UID_KEYWORD = {
    Level.INSTANCE: "SOPInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.STUDY: "StudyInstanceUID",
}


class Event(BaseModel):
    """One notification from Orthanc.

    `headers` maps DICOM keywords to string values (Orthanc's simplified JSON: numbers
    as strings, multi-values joined with a backslash). `orthanc` holds Orthanc's resource
    ids: `instance`, `series`, `study`, `patient` as far as they apply, and for series and
    study events `instances`: every instance id of the resource at the time it became stable.
    """

    model_config = ConfigDict(extra="allow")

    level: Level = Level.INSTANCE
    headers: dict[str, Any]
    orthanc: dict[str, Any] = Field(default_factory=dict)
    remoteAet: str | None = None
    remoteIp: str | None = None
    calledAet: str | None = None
    transferSyntax: str | None = None
    receivedAt: float | None = None
    #: Re-read from Orthanc by the plugin after a crash: scheduled only if no earlier copy was.
    replay: bool = False

    @model_validator(mode="after")
    def _has_uid(self) -> Event:
        keyword = UID_KEYWORD[self.level]
        if not str(self.headers.get(keyword) or "").strip():
            raise ValueError(f"{self.level.value} event without {keyword} in headers")
        return self

    @cached_property
    def uid(self) -> str:
        return str(self.headers[UID_KEYWORD[self.level]]).strip()

    @cached_property
    def key(self) -> str:
        """`instance:<SOPInstanceUID>`, `series:<SeriesInstanceUID>`, `study:<StudyInstanceUID>`."""
        return f"{self.level.value}:{self.uid}"

    def context(self) -> dict[str, Any]:
        """What a worker receives as its `event` keyword: everything but the headers.

        The same as ``model_dump(mode="json", exclude={"headers"})``, built directly: it is
        made twice per event (for the callbacks, and for the jobs, which must not see what a
        callback changed in its copy), and pydantic's dump was ~5 % of the scheduler's CPU.
        Every call returns a new copy.
        """
        out = {
            "level": self.level.value,
            "orthanc": {k: v if isinstance(v, str) else copy.deepcopy(v) for k, v in self.orthanc.items()},
            "remoteAet": self.remoteAet, "remoteIp": self.remoteIp, "calledAet": self.calledAet,
            "transferSyntax": self.transferSyntax, "receivedAt": self.receivedAt, "replay": self.replay,
        }
        if self.model_extra:  # fields of a newer plugin: JSON values, copied whole
            out.update(copy.deepcopy(self.model_extra))
        return out
