"""Workers of the built-in ChRIS service: store, register, finish a series (worker side)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from dicomflow.chris.jobs import finish_series, register_instance, store_instance
from dicomflow.chris.settings import ChrisSettings
from dicomflow.errors import EventError


def store(jobName: str, headers: Mapping[str, Any], params: Mapping[str, Any],
          added_params: Mapping[str, Any], dcmpath: str, event: Mapping[str, Any],
          config: Mapping[str, str], connection: redis.Redis, **kwargs: Any) -> dict[str, Any]:
    """Write the instance into CUBE's storage at its cube.md path, then register it (CUBE 5)."""
    return store_instance(ChrisSettings.from_config(config), connection, Path(dcmpath), event, register=True)


def register(jobName: str, headers: Mapping[str, Any], params: Mapping[str, Any],
             added_params: Mapping[str, Any], dcmpath: str, event: Mapping[str, Any],
             config: Mapping[str, str], connection: redis.Redis, **kwargs: Any) -> dict[str, Any]:
    """Register the stored instance (pacsfiles mode; a no-op in series mode).

    No built-in job runs it any more (`store` registers); kept for settings that still name it."""
    return register_instance(ChrisSettings.from_config(config), connection, Path(dcmpath), event)


def register_series(jobName: str, headers: Mapping[str, Any], params: Mapping[str, Any],
                    added_params: Mapping[str, Any], dcmpath: str, event: Mapping[str, Any],
                    config: Mapping[str, str], connection: redis.Redis, **kwargs: Any) -> dict[str, Any]:
    """Register the stable series (series mode) or mark it done (pacsfiles mode)."""
    series_uid = str(headers.get("SeriesInstanceUID") or "").strip()
    if not series_uid:
        raise EventError("series event without SeriesInstanceUID in headers")
    return finish_series(ChrisSettings.from_config(config), connection, Path(dcmpath), event, series_uid)
