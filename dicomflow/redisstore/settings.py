"""The store's configuration keys (REDIS_STORE_*), read from the configuration mapping or the environment."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dicomflow.errors import ConfigError
from dicomflow.redisstore.keys import DEFAULT_PREFIX

#: Default chunk size of the stored bytes (KiB).
DEFAULT_CHUNK_KB = 256


class StoreSettings(BaseModel):
    """Where and how instances are stored."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    url: str = Field(alias="REDIS_STORE_URL")
    prefix: str = Field(default=DEFAULT_PREFIX, alias="REDIS_STORE_PREFIX")
    chunk_kb: int = Field(default=DEFAULT_CHUNK_KB, alias="REDIS_STORE_CHUNK_KB", ge=1, le=512 * 1024)
    allow_queue_db: bool = Field(default=False, alias="REDIS_STORE_ALLOW_QUEUE_DB")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty (the store is off until it is set)")
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected redis://host:port/db, rediss:// or unix://, not {value!r}")
        return value.strip()

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("must be a non-empty string without spaces, e.g. dicom:")
        return value

    @property
    def chunk_size(self) -> int:
        """Chunk size in bytes."""
        return self.chunk_kb * 1024

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> StoreSettings:
        """Build from the configuration mapping (empty values count as unset).

        Raises:
            ConfigError: REDIS_STORE_URL is missing, or a value is malformed (the message names it).
        """
        names = ("REDIS_STORE_URL", "REDIS_STORE_PREFIX", "REDIS_STORE_CHUNK_KB", "REDIS_STORE_ALLOW_QUEUE_DB")
        keys = {k: config[k] for k in names if str(config.get(k, "")).strip() != ""}
        try:
            return cls.model_validate(keys)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"redisstore configuration: {problems}") from exc
