"""Fetching the next queued job's files while the current job runs.

A worker runs one job at a time: between two jobs it used to sit idle while the next job's
files came from Orthanc (8 files of a ChRIS batch: ~20 ms on a quiet machine, 40–70 ms while
Orthanc is receiving), and whatever the job feeds (CUBE) waited with it (issue 23). Once the
current job has its own files, a background thread reads the job at the head of the worker's
queues (the one RQ hands out next, to this worker or another on the host) and fetches its
instances into the host's cache; when that job starts, its files are there.

Only instance jobs (one file, or a `batchSize` job's files) are fetched ahead: a series or
study job's folder can be large, and a file fetched ahead costs only disk until the cache's
TTL if another host takes the job. Only with the `simple` worker class: a `fork` worker's
job ends with its process, and with it the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.queue import Queue

from worker.dicomcache import DicomCache

log = logging.getLogger(__name__)

#: The job function whose keywords say which files a job needs.
JOB_FUNCTION = "worker.runtime.run_service_job"


def instances_of(job: Job) -> list[tuple[str, str | None]]:
    """The (Orthanc instance id, Orthanc server name) pairs an instance job will fetch."""
    if job.func_name != JOB_FUNCTION:
        return []
    kwargs = job.kwargs
    items = kwargs.get("batch") if kwargs.get("batch") is not None else [kwargs]
    wanted = []
    for item in items:
        event = item.get("event") or {}
        orthanc = event.get("orthanc") or {}
        if event.get("level", "instance") == "instance" and orthanc.get("instance"):
            wanted.append((str(orthanc["instance"]), orthanc.get("server")))
    return wanted


class Prefetcher:
    """One background fetch at a time, of the job at the head of `queues` (priority order)."""

    def __init__(self, cache: DicomCache, queues: Sequence[str]):
        self.cache = cache
        self.queues = list(queues)
        self._thread: threading.Thread | None = None
        #: Files fetched ahead so far (for tests and the worker's log).
        self.fetched = 0

    def start(self, connection: redis.Redis) -> bool:
        """Fetch the next job's files in the background; False if the last fetch still runs."""
        if self._thread is not None and self._thread.is_alive():
            return False
        self._thread = threading.Thread(target=self._run, args=(connection,), name="prefetch", daemon=True)
        self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Until the background fetch (if any) is over."""
        if self._thread is not None:
            self._thread.join(timeout)

    def next_job(self, connection: redis.Redis) -> Job | None:
        """The job RQ hands out next from these queues, if any."""
        for name in self.queues:
            head = connection.lindex(Queue(name, connection=connection).key, 0)
            if head is None:
                continue
            try:
                return Job.fetch(head.decode(), connection=connection)
            except NoSuchJobError:   # taken and gone meanwhile
                return None
        return None

    def _run(self, connection: redis.Redis) -> None:
        try:
            job = self.next_job(connection)
            for orthanc_id, server in instances_of(job) if job is not None else []:
                self.cache.instance(orthanc_id, server, patiently=False)
                self.fetched += 1
        except Exception as exc:  # noqa: BLE001 - a hint only: the job fetches what is missing itself
            log.debug("prefetch failed (the job will fetch its files itself): %s: %s", type(exc).__name__, exc)

