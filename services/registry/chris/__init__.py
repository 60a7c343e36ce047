"""Callbacks of the built-in ChRIS service: which jobs an event gets (scheduler side)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dicomflow.chris.settings import chris_enabled


def want_store(jobName: str, headers: Mapping[str, Any], params: Mapping[str, Any],
               added_params: Mapping[str, Any], event: Mapping[str, Any] | None = None,
               config: Mapping[str, str] | None = None, **kwargs: Any) -> bool:
    """Every instance is stored (and, with CUBE 5, registered) once ChRIS is configured."""
    return chris_enabled(config or {})


def want_series(jobName: str, headers: Mapping[str, Any], params: Mapping[str, Any],
                added_params: Mapping[str, Any], event: Mapping[str, Any] | None = None,
                config: Mapping[str, str] | None = None, **kwargs: Any) -> bool:
    """Every stable series: registered (series mode) or marked done (pacsfiles mode)."""
    return chris_enabled(config or {})
