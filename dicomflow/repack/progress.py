"""Per-series progress of the repack service in Redis: instances repacked, failed, where they went."""

from __future__ import annotations

import time
from typing import Any

import redis

from dicomflow.keys import service_key

_KEYS = service_key("repack")
#: Sorted set SeriesInstanceUID -> last update (unix time): the listing of recent series.
INDEX_KEY = _KEYS + "series-index"
#: A series' progress is kept this long after its last change (seconds).
PROGRESS_TTL = 7 * 86400
INDEX_LENGTH = 10000


def _series_key(series_uid: str) -> str:
    return f"{_KEYS}series:{series_uid}"


def record(connection: redis.Redis, series_uid: str, *, folder: str | None = None,
           error: str | None = None, now: float | None = None) -> None:
    """Count one instance of a series: repacked into `folder`, or failed with `error`."""
    now = time.time() if now is None else now
    key = _series_key(series_uid)
    pipe = connection.pipeline()
    if error is None:
        pipe.hincrby(key, "repacked", 1)
        if folder:
            pipe.hset(key, "folder", folder)
    else:
        pipe.hincrby(key, "failed", 1)
        pipe.hset(key, "lastError", error[:2000])
    pipe.hset(key, "updatedAt", now)
    pipe.expire(key, PROGRESS_TTL)
    pipe.zadd(INDEX_KEY, {series_uid: now})
    pipe.zremrangebyrank(INDEX_KEY, 0, -INDEX_LENGTH - 1)
    pipe.execute()


def series_progress(connection: redis.Redis, series_uid: str) -> dict[str, Any] | None:
    """`{SeriesInstanceUID, repacked, failed, folder, lastError, updatedAt}`, None if unknown."""
    raw = {k.decode(): v.decode() for k, v in connection.hgetall(_series_key(series_uid)).items()}
    if not raw:
        return None
    return {"SeriesInstanceUID": series_uid, "repacked": int(raw.get("repacked", 0)),
            "failed": int(raw.get("failed", 0)), "folder": raw.get("folder"), "lastError": raw.get("lastError"),
            "updatedAt": float(raw.get("updatedAt", 0.0))}


def recent_series(connection: redis.Redis, limit: int = 50) -> list[dict[str, Any]]:
    """The most recently updated series, newest first."""
    found = (series_progress(connection, uid.decode())
             for uid in connection.zrevrange(INDEX_KEY, 0, max(limit, 1) - 1))
    return [item for item in found if item is not None]
