"""Jobs whose worker died are run again: heartbeats while a job runs, and a reaper in every worker.

RQ marks a running job in its queue's StartedJobRegistry with an expiry. A `SimpleWorker`
sets it once, to the job's timeout + 60 s, and never renews it: a worker killed mid-job left
the job `started` for an hour, then failed it (`AbandonedJobError`) and its dependents
waited for a person. Here:

- while a job runs, a heartbeat thread renews its entry (and the worker's) every
  `ttl / 4` seconds to `ttl` from now (`DICOMFLOW_JOB_HEARTBEAT_TTL`, default 60 s);
- every worker runs a reaper every `ttl / 4` seconds: an entry past its expiry belongs to a
  dead worker; the one reaper that removes it (atomically) puts the job back on its queue, so
  it runs again and its dependents follow. A job that killed its worker `MAX_REQUEUES` times
  fails instead, with an error saying so (a job that crashes every worker must not loop).

So a job of a dead worker is queued again within ttl + ttl / 4 seconds (75 s by default) as
long as one worker runs. Jobs are at-least-once: a job may run again after doing part (or all)
of its work, so workers must be idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from rq import Queue, SimpleWorker, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

log = logging.getLogger(__name__)

#: Times a job is put back after its worker died before it fails for good.
MAX_REQUEUES = 3

#: Remove one expired entry of a started registry; 1 for the one caller that removed it.
_TAKE = """
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


def requeue_abandoned(connection: redis.Redis, queue_names: Sequence[str], now: float | None = None) -> list[str]:
    """Put the jobs of dead workers back on their queues; the ids of the jobs this call handled.

    Safe to run in every worker at once: an entry is handled by the one call that removes it.
    """
    now = time.time() if now is None else now
    take = connection.register_script(_TAKE)
    handled = []
    for name in queue_names:
        queue = Queue(name, connection=connection)
        registry = StartedJobRegistry(queue=queue)
        for raw in connection.zrangebyscore(registry.key, 0, now):
            entry = raw.decode()
            if not take(keys=[registry.key], args=[entry]):
                continue  # another worker's reaper has it
            job_id = registry.parse_job_id(entry)
            try:
                job = Job.fetch(job_id, connection=connection)
            except NoSuchJobError:
                continue
            if job.get_status(refresh=False) != JobStatus.STARTED:
                continue  # it finished (or failed) as its worker went away
            _requeue_or_fail(job, queue, entry)
            handled.append(job_id)
    return handled


def _requeue_or_fail(job: Job, queue: Queue, entry: str) -> None:
    count = int(job.meta.get("requeuedAfterWorkerDied", 0)) + 1
    job.meta["requeuedAfterWorkerDied"] = count
    job.save_meta()
    if count <= MAX_REQUEUES:
        log.warning("job %s: its worker %s died while running it; queued again (%d of %d)",
                    job.id, job.worker_name or "?", count, MAX_REQUEUES)
        queue.enqueue_job(job)
        return
    message = (f"the worker running this job died {count} times (last: {job.worker_name or '?'}); "
               f"not run again: see the workers' logs (killed for memory?) and requeue it by hand")
    log.error("job %s: %s", job.id, message)
    with job.connection.pipeline() as pipe:
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        job._handle_failure(message, pipe, worker_name="")  # what RQ's own cleanup writes
        pipe.execute()
    queue.enqueue_dependents(job)


class LivenessMixin:
    """Heartbeats while a job runs (SimpleWorker), a short registry expiry, and the reaper thread."""

    #: Seconds without a heartbeat after which a running job counts as abandoned.
    heartbeat_ttl = 60

    def get_heartbeat_ttl(self, job: Job) -> int:
        return self.heartbeat_ttl

    def set_heartbeat_ttl(self, ttl: int) -> None:
        self.heartbeat_ttl = ttl
        self.job_monitoring_interval = max(1, int(ttl / 4))  # the fork worker's heartbeat period

    def start_reaper(self, queue_names: Sequence[str]) -> None:
        """Run `requeue_abandoned` every ttl / 4 seconds in a daemon thread."""
        thread = threading.Thread(target=self._reap, args=(list(queue_names),), name="dicomflow-reaper", daemon=True)
        thread.start()

    def _reap(self, queue_names: list[str]) -> None:
        interval = self.heartbeat_ttl / 4
        connection = self.connection  # type: ignore[attr-defined]
        while True:
            try:
                requeue_abandoned(connection, queue_names)
            except redis.RedisError as exc:
                log.warning("reaper: Redis unavailable (%s); trying again in %.0f s", exc, interval)
            except Exception:  # noqa: BLE001 - the thread's boundary: it must keep reaping
                log.exception("reaper failed; trying again in %.0f s", interval)
            time.sleep(interval)


class DicomflowSimpleWorker(LivenessMixin, SimpleWorker):
    """RQ's SimpleWorker (jobs in the worker process) with heartbeats while a job runs."""

    def execute_job(self, job: Job, queue: Queue) -> Any:
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, done), name="dicomflow-heartbeat", daemon=True)
        beat.start()
        try:
            return super().execute_job(job, queue)
        finally:
            done.set()

    def _beat(self, job: Job, done: threading.Event) -> None:
        while not done.wait(self.heartbeat_ttl / 4):
            try:
                self.maintain_heartbeats(job)
            except redis.RedisError as exc:
                log.warning("heartbeat of job %s failed: %s", job.id, exc)
            except Exception:  # noqa: BLE001 - the thread's boundary: the job itself goes on
                log.exception("heartbeat of job %s failed", job.id)


class DicomflowForkWorker(LivenessMixin, Worker):
    """RQ's forking Worker; its own monitor loop renews the heartbeat every ttl / 4 seconds."""
