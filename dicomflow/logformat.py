"""The one log line format of dicomflow's processes (scheduler, the gunicorn serving it, workers)."""

from __future__ import annotations

import logging

#: `2026-12-02 12:19:05,123 scheduler.app INFO message`: time, logger, level, message.
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def configure(level: int = logging.INFO) -> None:
    """Send every logger's records to stderr in `LOG_FORMAT` (one format per log file)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
