"""A head start on the next queued job, for a service whose own job would otherwise idle.

RQ runs one job at a time per worker. A batched ChRIS job ends when CUBE has answered its last
registration; until the next job has started, read its first file and sent its first
registration, CUBE has nothing to do: ~14 ms at each of a series' 24 job boundaries, with one
worker 0.3-0.5 s of a 4.3 s series (issue 23; `bench/chris_rate.py --verbose`). A worker
function that takes a keyword `ahead` is handed a callable that names the job this worker will
run next, with the files of it that this host holds already (fetched ahead, worker/prefetch.py),
so that it can start on them while it waits for its own replies.

What it starts is an early copy of work the next job does anyway: that job still runs as usual,
and if the process dies first, RQ hands it out again and it does everything itself. Only when
no other worker listens on that job's queue, so that no one else can start it meanwhile:
with several workers they cover each other's boundaries, and an early copy would be done twice.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from rq.job import Job
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from worker.dicomcache import DicomCache
from worker.prefetch import JOB_FUNCTION, Prefetcher

log = logging.getLogger(__name__)

#: The keyword a worker function declares to be given the next job.
KEYWORD = "ahead"


@dataclass(frozen=True)
class NextJob:
    """The job this worker runs next: `items` are those of its `batch` whose files this host
    holds, each with its `dcmpath` (the cached file), in the batch's order, up to the first
    one it does not hold."""

    job: Job
    items: list[dict[str, Any]]


def wants_ahead(func: Callable[..., Any]) -> bool:
    """Whether a worker function takes the `ahead` keyword."""
    try:
        return KEYWORD in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def next_job(prefetcher: Prefetcher, cache: DicomCache, connection: redis.Redis, current: Job,
             worker: str) -> NextJob | None:
    """The batched job RQ hands this worker next, if it runs the same service function `worker`
    and no other worker listens on its queue; None otherwise (or when Redis cannot say)."""
    try:
        job = prefetcher.next_job(connection)
        if job is None or job.id == current.id or job.func_name != JOB_FUNCTION:
            return None
        kwargs = job.kwargs
        if kwargs.get("worker") != worker or not kwargs.get("batch"):
            return None
        if connection.scard(WORKERS_BY_QUEUE_KEY % job.origin) != 1:
            return None
    except redis.RedisError as exc:
        log.debug("no head start on the next job: %s", exc)
        return None
    items = []
    for item in kwargs["batch"]:
        orthanc_id = str(((item.get("event") or {}).get("orthanc") or {}).get("instance") or "")
        if not cache.has(orthanc_id):
            break
        items.append({**item, "dcmpath": str(cache.instances / f"{orthanc_id}.dcm")})
    return NextJob(job, items)
