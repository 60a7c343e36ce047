"""The repack service's own configuration keys (REPACK_*), read from the `config` mapping it is handed."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dicomflow.errors import ConfigError


class RepackSettings(BaseModel):
    """Where the repack service writes: the pypx data folder and (optionally) the log folder."""

    model_config = ConfigDict(frozen=True)

    datadir: str = Field(alias="REPACK_DATADIR")
    logdir: str | None = Field(default=None, alias="REPACK_LOGDIR")

    @field_validator("datadir")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("logdir")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value if value and value.strip() else None

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> RepackSettings:
        """Build from the configuration mapping.

        Raises:
            ConfigError: REPACK_DATADIR is missing or empty.
        """
        keys = {k: config[k] for k in ("REPACK_DATADIR", "REPACK_LOGDIR") if k in config}
        try:
            return cls.model_validate(keys)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"repack service configuration: {problems}") from exc
