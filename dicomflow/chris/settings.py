"""The settings of the ChRIS services, built once from the configuration mapping."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dicomflow.config import settings_from_config


#: The configuration keys without which the ChRIS services stay off.
REQUIRED_KEYS = ("CHRIS_URL", "CHRIS_FILES_ROOT")


class Registration(str, Enum):
    """Which CUBE API registers the files."""

    AUTO = "auto"
    PACSFILES = "pacsfiles"  # CUBE 5: POST /api/v1/pacsfiles/ per file
    SERIES = "series"  # CUBE 6+: POST /api/v1/pacs/series/ per series


class ChrisSettings(BaseModel):
    """Where CUBE and its storage are, how to authenticate and how hard to push."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    url: str = Field(alias="CHRIS_URL")
    files_root: Path = Field(alias="CHRIS_FILES_ROOT")
    username: str = Field(default="chris", alias="CHRIS_USERNAME")
    password: str = Field(default="", alias="CHRIS_PASSWORD")
    #: A ready token (`Authorization: Token ...`); without one, one is fetched from auth-token/.
    token: str = Field(default="", alias="CHRIS_TOKEN")
    #: Total number of attempts per request, one right after the other (a dropped keep-alive
    #: connection, a blip). Longer outages are RQ's to retry: the job fails and waits in Redis
    #: (`retry` in settings.json), not in a sleeping worker — one retry layer (issue 21).
    http_retries: int = Field(default=2, ge=1, alias="CHRIS_HTTP_RETRIES")
    #: The pause before retry n is min(base * 2**n, cap) seconds: at most a second by default.
    retry_base: float = Field(default=0.25, ge=0, alias="CHRIS_RETRY_BASE")
    retry_cap: float = Field(default=1.0, ge=0, alias="CHRIS_RETRY_CAP")
    #: Seconds per request; CUBE's series API may poll its storage for ~30 s before answering.
    http_timeout: float = Field(default=60.0, gt=0, alias="CHRIS_HTTP_TIMEOUT")
    #: The PACS name; empty: the calling AE title of the sender (event["remoteAet"]).
    pacs_name: str = Field(default="", alias="CHRIS_PACS_NAME")
    registration: Registration = Field(default=Registration.AUTO, alias="CHRIS_REGISTRATION")
    #: Requests per second to CUBE from all workers together; 0 = unlimited.
    rate_limit: float = Field(default=0.0, ge=0, alias="CHRIS_RATE_LIMIT")
    #: How many seconds of requests the token bucket lets through at once.
    rate_burst: float = Field(default=1.0, gt=0, alias="CHRIS_RATE_BURST")
    #: Registrations a batch job keeps in flight at once. CUBE 5 takes one at a time, so with one
    #: the worker's own work between two of them (Redis, JSON, HTTP) left CUBE idle every time;
    #: with two the next one waits in CUBE while the last is answered (issue 23, docs/chris.md).
    registrations_in_flight: int = Field(default=2, ge=1, le=16, alias="CHRIS_REGISTRATIONS_IN_FLIGHT")
    #: How long a series job waits for the store/register jobs of its series.
    series_wait: float = Field(default=300.0, ge=0, alias="CHRIS_SERIES_WAIT")
    nats_url: str = Field(default="", alias="NATS_URL")
    #: At most one LONK progress message per series per this many seconds.
    progress_interval: float = Field(default=0.5, ge=0, alias="CHRIS_PROGRESS_INTERVAL")

    @field_validator("url")
    @classmethod
    def _api_root(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL of CUBE's /api/v1/ root")
        return value if value.endswith("/") else value + "/"

    @field_validator("registration", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _credentials(self) -> ChrisSettings:
        if not self.token and not self.password:
            raise ValueError("CHRIS_PASSWORD or CHRIS_TOKEN is required")
        return self

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> ChrisSettings:
        """Build the settings from the flat configuration mapping; empty values count as unset.

        Raises:
            ConfigError: a key is missing or malformed; the message names it.
        """
        return settings_from_config(cls, config, "ChRIS")


def chris_enabled(config: Mapping[str, str]) -> bool:
    """True when every key in REQUIRED_KEYS is set (the services stay off until then)."""
    return all(str(config.get(key, "")).strip() for key in REQUIRED_KEYS)
