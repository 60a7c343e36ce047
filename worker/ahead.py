"""A head start on the next queued job, for a service whose own job would otherwise idle.

RQ runs one job at a time per worker. A batched ChRIS job ends when CUBE has answered its last
registration; until the next job has started, read its first file and sent its first
registration, CUBE has nothing to do: ~14 ms at each of a series' ~25 job boundaries, with one
worker 0.3-0.5 s of a 4.3 s series (issue 23; `bench/chris_rate.py --verbose`). A worker
function that takes a keyword `ahead` is handed a callable that names the job this worker will
run next, with the files of it that this host holds already (fetched ahead, worker/prefetch.py),
so that it can start on them while it waits for its own replies.

What it starts is an early copy of work the next job does anyway: that job still runs as usual,
and if the process dies first, RQ hands it out again and it does everything itself. Only when
no other worker listens on that job's queue: with several workers they cover each other's
boundaries. That is checked when the head start begins; a worker that comes up a moment later
can still take the job first (CI saw it: one registration sent twice). So the head start is
claimed in Redis (`Claim`) for that queued run of the job, and the job's start claims it too:
whichever comes first holds it. A job that finds items begun by another process waits for
their outcome (`Claim.wait`) instead of doing them again.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from rq.job import Job
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from dicomflow import keys
from worker.dicomcache import DicomCache
from worker.prefetch import JOB_FUNCTION, Prefetcher

log = logging.getLogger(__name__)

#: The keyword a worker function declares to be given the next job.
KEYWORD = "ahead"

#: How long a claim is kept (ms): beyond any wait for it. Not deleted when the job ends, so
#: that a worker that saw the job queued a moment before cannot claim it after it ran; a run
#: that is queued again (a retry) has another enqueue time, hence a claim of its own.
CLAIM_TTL_MS = 600_000
#: Tells this worker process from any other, on any host (a forked child has its own pid).
_NONCE = uuid.uuid4().hex[:8]

#: Take the claim unless another process holds it; if this one does, mark ARGV[3..] as begun.
#: Returns the hash: `owner`, and `item:<name>` -> '' while under way, then the outcome (JSON).
_TAKE = """
redis.call('HSETNX', KEYS[1], 'owner', ARGV[1])
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  for i = 3, #ARGV do redis.call('HSETNX', KEYS[1], 'item:' .. ARGV[i], '') end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""


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


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_NONCE}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Claimed:
    """A claim as taken: whether this process holds it, and the items begun under it (item ->
    its outcome as recorded, None while under way)."""

    mine: bool
    begun: dict[str, dict[str, Any] | None]


class Claim:
    """The head start on one queued run of `job`, in Redis (`keys.head_start`): the first
    process to take it holds it, by beginning items of the job early (`take(items)`) or by
    starting the job (`take()`). Whoever begins an item records its outcome (`record`)."""

    def __init__(self, connection: redis.Redis, job: Job):
        self.connection = connection
        self.key = keys.head_start(job.id, job.enqueued_at.isoformat() if job.enqueued_at else "")

    def take(self, items: Sequence[str] = ()) -> Claimed:
        """Take the claim (if no other process holds it) and, if this process holds it, mark
        `items` as begun by it. Raises redis.RedisError."""
        flat = self.connection.register_script(_TAKE)(keys=[self.key], args=[_me(), CLAIM_TTL_MS, *items])
        fields = {_text(k): _text(v) for k, v in zip(flat[::2], flat[1::2])}
        begun = {name[5:]: (json.loads(value) if value else None)
                 for name, value in fields.items() if name.startswith("item:")}
        return Claimed(fields.get("owner") == _me(), begun)

    def record(self, item: str, outcome: Mapping[str, Any]) -> None:
        """Record what came of an item this process began (JSON-able). Raises redis.RedisError."""
        self.connection.hset(self.key, f"item:{item}", json.dumps(outcome, default=str))

    def wait(self, item: str, timeout: float, poll: float = 0.005) -> dict[str, Any] | None:
        """The outcome of `item`, begun by another process, once recorded; None if it is not
        within `timeout` seconds (that process died, or is still at it: do it yourself)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.connection.hget(self.key, f"item:{item}")
            if value:
                return json.loads(value)
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll)
            poll = min(poll * 2, 0.1)
