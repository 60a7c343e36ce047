"""The events the Orthanc plugin sends to the scheduler, one per stored instance or stable series/study."""

from __future__ import annotations

import copy
import re
from enum import Enum
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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


#: The UID headers an event may carry; when present, each must be a UID string (`_uid_headers`).
UID_HEADERS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")

#: The longest UID accepted: twice the standard's 64 characters. Files in the wild break the
#: 64 (UIDs of 65-70 characters are reported) and Orthanc stores them; the scheduler only
#: needs a bounded key, so it refuses only what is no UID at all.
MAX_UID_LENGTH = 128

#: What DICOM readers strip from a UI value: space and NUL padding (the plugin does the same).
_UID_PADDING = " \x00"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: Orthanc's resource ids: a SHA-1 as five dash-separated groups of 8 lowercase hex digits.
ORTHANC_ID = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{8}){4}")

#: The name of the Orthanc that holds an event's instances (`orthanc.server`: its `Name`,
#: ORTHANC_NAME), which workers map to its REST URL (ORTHANC_URLS).
SERVER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _shown(value: Any) -> str:
    """A value for an error message, bounded."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    #: Series/study events the scheduler fires for a completed push: the push's id (a ULID).
    push: str | None = None

    @model_validator(mode="after")
    def _has_uid(self) -> Event:
        keyword = UID_KEYWORD[self.level]
        if not str(self.headers.get(keyword) or "").strip():
            raise ValueError(f"{self.level.value} event without {keyword} in headers")
        return self

    @field_validator("headers")
    @classmethod
    def _uid_headers(cls, headers: dict[str, Any]) -> dict[str, Any]:
        """The UID headers, when present, are UID strings: a number, bool, list or object
        (or an empty, overlong or control-character value) makes the event invalid. Space and
        NUL padding is stripped, as DICOM readers do. Characters other than digits and dots
        are accepted: non-conformant UIDs exist in real files, and Orthanc stores them.
        A null counts as absent."""
        stripped: dict[str, str] = {}
        for keyword in UID_HEADERS:
            value = headers.get(keyword)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"{keyword} must be a string (a DICOM UID), not {type(value).__name__} "
                                 f"{_shown(value)}")
            uid = value.strip(_UID_PADDING)
            if not uid:
                raise ValueError(f"{keyword} is empty")
            if len(uid) > MAX_UID_LENGTH:
                raise ValueError(f"{keyword} is {len(uid)} characters long, more than {MAX_UID_LENGTH}: "
                                 f"{_shown(uid)}")
            if _CONTROL.search(uid):
                raise ValueError(f"{keyword} holds control characters: {_shown(uid)}")
            if uid != value:
                stripped[keyword] = uid
        return {**headers, **stripped} if stripped else headers

    @model_validator(mode="after")
    def _has_instance_id(self) -> Event:
        """An instance event names its Orthanc instance: without it no worker gets its file."""
        if self.level is Level.INSTANCE:
            instance = self.orthanc.get("instance")
            if not isinstance(instance, str) or not ORTHANC_ID.fullmatch(instance):
                what = "without orthanc.instance" if instance is None else \
                    f"with orthanc.instance {_shown(instance)}, which is not an Orthanc id"
                raise ValueError(f"instance event {what} (an Orthanc id is 5 groups of 8 hex digits "
                                 "separated by dashes)")
        return self

    @model_validator(mode="after")
    def _server_name(self) -> Event:
        """`orthanc.server`, when present, is a name a worker can look up (not a URL to follow)."""
        server = self.orthanc.get("server")
        if server is not None and not (isinstance(server, str) and SERVER_NAME.fullmatch(server)):
            raise ValueError(f"orthanc.server {_shown(server)} is not an Orthanc name (letters, digits, "
                             "'.', '_', '-'; at most 64)")
        return self

    @cached_property
    def uid(self) -> str:
        return str(self.headers[UID_KEYWORD[self.level]]).strip()

    @cached_property
    def sender(self) -> str:
        """Who delivered it: the calling AE title ("" for a REST upload), and `@<server>` when the
        event names the Orthanc that received it. A push is per sender, so the same instance sent
        to two receivers is two deliveries (docs/scaling.md): each push's files are on its receiver."""
        aet = (self.remoteAet or "").strip()
        server = self.orthanc.get("server")
        return f"{aet}@{server}" if server else aet

    @cached_property
    def key(self) -> str:
        """What identifies an event: `instance:<AE>:<SOPInstanceUID>` (the same instance from
        another sender is another event), `series:<AE>:<SeriesInstanceUID>:<push>` and
        `study:<AE>:<StudyInstanceUID>:<push>` (one per completed push); a series/study event
        without a push (an outside source) is `series:<AE>:<SeriesInstanceUID>`. `<AE>` is
        `<AE>@<server>` when the event names the Orthanc that received it (`sender`)."""
        base = f"{self.level.value}:{self.sender}:{self.uid}"
        return f"{base}:{self.push}" if self.push else base

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
            "push": self.push,
        }
        if self.model_extra:  # fields of a newer plugin: JSON values, copied whole
            out.update(copy.deepcopy(self.model_extra))
        return out
