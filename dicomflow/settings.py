"""The core settings, built once per process from the configuration and passed explicitly."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dicomflow.config import settings_from_config

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseModel):
    """What the scheduler and the workers need; services read their own keys from `config`."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    home: Path = Field(default=REPO_ROOT / "state", alias="DICOMFLOW_HOME")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", alias="DICOMFLOW_REDIS_URL")
    services_dir: Path = Field(default=REPO_ROOT / "services", alias="DICOMFLOW_SERVICES_DIR")
    #: RQ queue names, highest priority first; a service's `priority` must be one of them.
    queues: tuple[str, ...] = Field(default=("high", "default", "low"), alias="DICOMFLOW_QUEUES")
    #: RQ worker class: "simple" runs jobs in the worker process, "fork" forks a child per job.
    worker_class: Literal["simple", "fork"] = Field(default="simple", alias="DICOMFLOW_WORKER_CLASS")
    scheduler_token: str = Field(default="", alias="DICOMFLOW_SCHEDULER_TOKEN")
    scheduler_host: str = Field(default="127.0.0.1", alias="DICOMFLOW_SCHEDULER_HOST")
    scheduler_port: int = Field(default=8642, alias="DICOMFLOW_SCHEDULER_PORT")
    #: How often (seconds) the scheduler looks for changed services.
    registry_poll: float = Field(default=2.0, alias="DICOMFLOW_REGISTRY_POLL")
    dashboard_host: str = Field(default="127.0.0.1", alias="DICOMFLOW_DASHBOARD_HOST")
    dashboard_port: int = Field(default=9181, alias="DICOMFLOW_DASHBOARD_PORT")
    dashboard_username: str = Field(default="admin", alias="DICOMFLOW_DASHBOARD_USERNAME")
    dashboard_password: str = Field(default="", alias="DICOMFLOW_DASHBOARD_PASSWORD")
    orthanc_url: str = Field(default="http://127.0.0.1:8042", alias="ORTHANC_URL")
    orthanc_username: str = Field(default="", alias="ORTHANC_USERNAME")
    orthanc_password: str = Field(default="", alias="ORTHANC_PASSWORD")
    #: The name events give the Orthanc at ORTHANC_URL (its `Name`; the plugin puts it in `orthanc.server`).
    orthanc_name: str = Field(default="dicomflow", alias="ORTHANC_NAME")
    #: Other Orthancs (receivers at other sites) by name: `NAME=URL,...`, a URL may hold
    #: `user:password@` when that Orthanc's credentials differ from ORTHANC_USERNAME/PASSWORD.
    orthanc_urls: Mapping[str, str] = Field(default_factory=dict, alias="ORTHANC_URLS")
    #: How long a worker keeps fetching a file while Orthanc is unreachable or answers 5xx (s).
    orthanc_retry_seconds: float = Field(default=120.0, ge=0, alias="DICOMFLOW_ORTHANC_RETRY_SECONDS")
    #: Where workers keep the DICOM files they fetch from Orthanc (one copy per host).
    cache_dir: Path | None = Field(default=None, alias="DICOMFLOW_CACHE_DIR")
    #: Cached files untouched for this many seconds are removed.
    cache_ttl: int = Field(default=3600, alias="DICOMFLOW_CACHE_TTL")
    #: Whether a worker fetches the next queued instance job's files while its job runs
    #: (worker/prefetch.py; `simple` worker class only).
    prefetch: bool = Field(default=True, alias="DICOMFLOW_PREFETCH")
    result_ttl: int = Field(default=86400, alias="DICOMFLOW_RESULT_TTL")
    failure_ttl: int = Field(default=7 * 86400, alias="DICOMFLOW_FAILURE_TTL")
    #: Seconds without a heartbeat after which a running job's worker counts as dead and the
    #: job is queued again (worker/liveness.py); heartbeats come every quarter of it.
    job_heartbeat_ttl: int = Field(default=60, ge=4, alias="DICOMFLOW_JOB_HEARTBEAT_TTL")
    #: Default job timeout (seconds) for services that set none.
    default_timeout: int = Field(default=3600, alias="DICOMFLOW_DEFAULT_TIMEOUT")
    #: How many callback errors / event errors the scheduler keeps for operators.
    error_log_length: int = Field(default=1000, alias="DICOMFLOW_ERROR_LOG_LENGTH")
    #: Seconds after a push's last instance before its series/study counts as complete (the
    #: pipeline's own StableAge; Orthanc's setting of the same name for the same idea).
    stable_age: float = Field(default=60.0, gt=0, alias="ORTHANC_STABLE_AGE")
    #: How often (seconds) the scheduler looks for completed pushes.
    push_poll: float = Field(default=0.5, gt=0, alias="DICOMFLOW_PUSH_POLL")
    #: Seconds a service's callback may take for one event; 0: no limit.
    callback_timeout: float = Field(default=10.0, ge=0, alias="DICOMFLOW_CALLBACK_TIMEOUT")
    #: Consecutive callback time-outs after which a service is switched off (reported; resumed
    #: by the API or by changing its settings).
    callback_strikes: int = Field(default=3, ge=1, alias="DICOMFLOW_CALLBACK_STRIKES")
    #: Everything from the configuration file and the environment, for services.
    config: Mapping[str, str] = Field(default_factory=dict, exclude=True)

    @field_validator("queues", mode="before")
    @classmethod
    def _split_queues(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(q.strip() for q in value.split(",") if q.strip())
        if not value:
            raise ValueError("at least one queue is needed")
        return value

    @field_validator("orthanc_urls", mode="before")
    @classmethod
    def _split_orthanc_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            pairs = {}
            for entry in (e.strip() for e in value.split(",") if e.strip()):
                name, sep, url = entry.partition("=")
                if not sep or not name.strip() or not url.strip().startswith(("http://", "https://")):
                    raise ValueError(f"expected NAME=http(s)://host:port, got {entry!r}")
                pairs[name.strip()] = url.strip()
            return pairs
        return value

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir or self.home / "cache"

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> Settings:
        """Build the settings from a flat configuration mapping (see `dicomflow.config`).

        Raises:
            ConfigError: a value has the wrong form; the message names the key.
        """
        return settings_from_config(cls, config, "dicomflow", config=MappingProxyType(dict(config)))
