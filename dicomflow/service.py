"""The service format: one job of a service's `settings.json`, validated."""

from __future__ import annotations

import keyword
import sys
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dicomflow.errors import ServiceNameError
from dicomflow.events import Level

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_DURATION = re.compile(r"^\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*(?:(\d+)\s*s?)?\s*$", re.IGNORECASE)

#: Names a service may not take: they would shadow what the worker and scheduler import.
RESERVED_NAMES = frozenset({"dicomflow", "scheduler", "worker", "rq", "redis", "flask", "tests", "bench",
                            "pydicom", "pynetdicom", "requests", "pydantic", "orthanc", "services"})


def check_service_name(name: str) -> str:
    """Return `name` if it can be a service (and Python package) name.

    Raises:
        ServiceNameError: not a Python identifier, a keyword, or a reserved module name.
    """
    if not name.isidentifier() or not name.isascii() or keyword.iskeyword(name):
        raise ServiceNameError(f"service name {name!r} is not a Python identifier "
                               "(letters, digits and _ only, not starting with a digit)")
    if name in RESERVED_NAMES or name in sys.stdlib_module_names:
        raise ServiceNameError(f"service name {name!r} is reserved (it would shadow a module of Python or dicomflow)")
    return name


def parse_duration(value: Any) -> int:
    """Seconds from a number or a string like "1h", "30m", "45s", "1h30m", "90".

    Raises:
        ValueError: anything else, or a duration that is not positive.
    """
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30m'")
    if isinstance(value, (int, float)):
        seconds = int(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)) and any(match.groups()):
        hours, minutes, secs = (int(g) if g else 0 for g in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    else:
        raise ValueError(f"{value!r} is not a duration (use seconds or '1h', '30m', '45s')")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


class RetrySpec(BaseModel):
    """`retry`: how many more attempts after a failure, and the pause before each (seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max: int = Field(ge=1, le=100)
    interval: list[int] = Field(default_factory=lambda: [0])

    @field_validator("interval", mode="before")
    @classmethod
    def _intervals(cls, value: Any) -> Any:
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list):
            return [parse_duration(v) if v not in (0, "0") else 0 for v in value]
        return value


class JobSpec(BaseModel):
    """One job a service offers (one object of its settings.json).

    The dcm-processor fields keep their names; ours (`triggerLevel`, `retry`,
    `runOnDependencyFailure`, `enabled`, `requiresConfig`, `batchSize`, `fanOut`) follow the same style.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    jobName: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_-]+$")
    worker: str
    callback: str | None = None
    dependsOn: tuple[str, ...] = ()
    priority: str = "default"
    timeout: int | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    sortPosition: float | None = None
    description: str = ""
    triggerLevel: Level = Level.INSTANCE
    retry: RetrySpec | None = None
    runOnDependencyFailure: bool = False
    enabled: bool = True
    requiresConfig: tuple[str, ...] = ()
    #: Instance jobs only: up to this many instances of one series from one sender, planned in
    #: the same delivery, share one job (its worker gets them as `batch`; docs/services.md).
    batchSize: int = Field(default=1, ge=1, le=256)
    #: The key of the callback's dict that holds a list: one job per item, each given the dict
    #: with that key narrowed to its one item (e.g. one deid job per project; docs/services.md).
    fanOut: str | None = Field(default=None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_]+$")

    @field_validator("worker", "callback")
    @classmethod
    def _dotted(cls, value: str | None) -> str | None:
        if value is not None and not _DOTTED.match(value):
            raise ValueError(f"{value!r} is not of the form package.function")
        return value

    @field_validator("dependsOn", "requiresConfig", mode="before")
    @classmethod
    def _string_or_list(cls, value: Any) -> Any:
        if value is None or value == "":
            return ()
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> Any:
        return None if value is None else parse_duration(value)

    @field_validator("retry", mode="before")
    @classmethod
    def _retry(cls, value: Any) -> Any:
        if value is None or value == 0 or value is False:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return {"max": value}
        return value

    @model_validator(mode="after")
    def _not_self_dependent(self) -> JobSpec:
        if self.jobName in self.dependsOn:
            raise ValueError(f"job {self.jobName} depends on itself")
        return self

    @model_validator(mode="after")
    def _batches_of_instances(self) -> JobSpec:
        if self.batchSize > 1 and self.triggerLevel is not Level.INSTANCE:
            raise ValueError(f"batchSize applies to instance jobs; {self.jobName} triggers on "
                             f"{self.triggerLevel.value}s")
        return self

    @model_validator(mode="after")
    def _fan_out_needs_a_callback(self) -> JobSpec:
        if self.fanOut is not None and self.callback is None:
            raise ValueError(f"fanOut needs a callback: {self.jobName}'s callback names the items")
        if self.fanOut is not None and self.batchSize > 1:
            raise ValueError(f"{self.jobName}: fanOut and batchSize exclude each other")
        return self

    @property
    def unknown_fields(self) -> list[str]:
        """Fields settings.json has that dicomflow does not know (kept, reported as warnings)."""
        return sorted(self.model_extra or {})

    def missing_config(self, config: dict[str, str] | Any) -> list[str]:
        """The `requiresConfig` keys that are empty or absent in `config`."""
        return [key for key in self.requiresConfig if not str(config.get(key, "") or "").strip()]
