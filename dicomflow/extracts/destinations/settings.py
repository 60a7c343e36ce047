"""The settings of export destinations (timeouts, attempts, the bounded rate-limit wait)."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field

from dicomflow.config import settings_from_config


class DestinationSettings(BaseModel):
    """What every destination shares; a destination's own rate and batch bounds are in its project."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    #: Longest wait for one rate-limit token before the send stops and is retried later.
    rate_max_wait: float = Field(default=60.0, gt=0, alias="DICOMFLOW_EXPORT_RATE_MAX_WAIT")
    #: Seconds per request (STOW-RS) or per FTP operation.
    timeout: float = Field(default=60.0, gt=0, alias="DICOMFLOW_EXPORT_TIMEOUT")
    #: Attempts per request / file when the server is unreachable or answers 5xx.
    attempts: int = Field(default=3, ge=1, le=20, alias="DICOMFLOW_EXPORT_ATTEMPTS")
    #: Back-off before attempt n+1: min(base * 2**n, 30) seconds.
    retry_base: float = Field(default=1.0, ge=0, alias="DICOMFLOW_EXPORT_RETRY_BASE")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (0-based)."""
        return min(self.retry_base * 2 ** attempt, 30.0)

    @classmethod
    def from_config(cls, config: Mapping[str, str]) -> DestinationSettings:
        """Build from the flat configuration mapping.

        Raises:
            ConfigError: a value has the wrong form; the message names the key.
        """
        return settings_from_config(cls, config, "export destinations")
