"""What every dicomflow job runs on a worker: resolve the service's worker and call it."""

from __future__ import annotations

import importlib
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis
from rq import get_current_job

from dicomflow.config import load_config
from dicomflow.settings import Settings
from worker.ahead import KEYWORD as AHEAD, next_job, wants_ahead
from worker.dicomcache import DicomCache
from worker.prefetch import Prefetcher

log = logging.getLogger(__name__)

#: How many files of a batched job are fetched from Orthanc at once.
FETCH_THREADS = 4


class WorkerRuntime:
    """Per-process state of a worker: settings, configuration, the DICOM cache and its prefetcher."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.cache = DicomCache(settings)
        #: Fetches the next queued job's files while a job runs (None: off, or a fork worker).
        self.prefetcher = (Prefetcher(self.cache, settings.queues)
                           if settings.prefetch and settings.worker_class == "simple" else None)
        #: Worker function -> whether it takes the `ahead` keyword (worker/ahead.py).
        self._wants_ahead: dict[str, bool] = {}
        modules = str(settings.services_dir / "modules")
        if modules not in sys.path:
            sys.path.append(modules)

    def preload(self) -> list[str]:
        """Import every service's worker package now, not in its first job: a job's own time
        should not include pydicom's and the service's imports (0.5 s of CPU for the ChRIS
        service's first job, measured with py-spy in bench/chris_rate.py). A package that
        fails to import is logged and left to fail its own jobs, with the same error, later.

        Returns the packages imported.
        """
        loaded = []
        for init in sorted((self.settings.services_dir / "modules").glob("*/__init__.py")):
            name = init.parent.name
            try:
                importlib.import_module(name)
            except Exception as exc:  # noqa: BLE001 - service code: its jobs report it, the worker goes on
                log.warning("service package %s does not import (its jobs will fail): %s: %s",
                            name, type(exc).__name__, exc)
            else:
                loaded.append(name)
        return loaded

    def resolve(self, dotted: str):
        """Import `package.function` from services/modules."""
        module_path, _, attr = dotted.rpartition(".")
        module = importlib.import_module(module_path)
        return getattr(module, attr)

    def takes_ahead(self, dotted: str, func: Any) -> bool:
        """Whether the worker function `dotted` is to be handed the next job (worker/ahead.py)."""
        wanted = self._wants_ahead.get(dotted)
        if wanted is None:
            wanted = self._wants_ahead[dotted] = wants_ahead(func)
        return wanted

    def dcmpath(self, event: Mapping[str, Any], job_id: str) -> Path | None:
        """The local file (instance events) or folder (series/study events) for a job, from the
        Orthanc the event names (`orthanc.server`; none: ORTHANC_URL)."""
        orthanc = event.get("orthanc") or {}
        server = orthanc.get("server")
        if event.get("level", "instance") == "instance":
            return self.cache.instance(orthanc["instance"], server) if orthanc.get("instance") else None
        if orthanc.get("instances"):
            return self.cache.folder(orthanc["instances"], job_id, server)
        return None

    def batch(self, items: list[dict[str, Any]], job_id: str) -> tuple[list[dict[str, Any]], Path]:
        """A batched job's items, each with its `dcmpath`, and the folder that holds them all.

        Raises:
            OrthancError: an item has no usable Orthanc instance id, or Orthanc could not give it.
        """
        orthancs = [(item.get("event") or {}).get("orthanc") or {} for item in items]
        ids = [str(orthanc.get("instance") or "") for orthanc in orthancs]
        # One Orthanc per batch: the scheduler never puts instances another Orthanc holds together.
        server = orthancs[0].get("server") if orthancs else None
        unique = list(dict.fromkeys(ids))
        # Usually all fetched ahead (worker/prefetch.py): then no threads are started, which cost
        # a job ~2 ms before its first instance while CUBE waited (bench/chris_rate.py).
        missing = [orthanc_id for orthanc_id in unique if not self.cache.has(orthanc_id)]
        if len(missing) > 1:
            # Fetched side by side: one after the other, a batch's files were a pause of the
            # job's whole pipeline (8 x 1-9 ms, by load; bench/chris_rate.py); Orthanc serves
            # its REST API from a pool of threads.
            with ThreadPoolExecutor(min(FETCH_THREADS, len(missing)), thread_name_prefix="fetch") as pool:
                for _ in pool.map(lambda orthanc_id: self.cache.instance(orthanc_id, server), missing):
                    pass
        folder = self.cache.folder(unique, job_id, server)
        return [{**item, "dcmpath": str(folder / f"{orthanc_id}.dcm")} for item, orthanc_id in zip(items, ids)], folder


_runtime: WorkerRuntime | None = None


def install(runtime: WorkerRuntime) -> None:
    """Make `runtime` the one jobs of this process use (the worker CLI does this once)."""
    global _runtime
    _runtime = runtime


def current_runtime() -> WorkerRuntime:
    """The installed runtime; built from the configuration when a plain `rq worker` runs jobs."""
    global _runtime
    if _runtime is None:
        _runtime = WorkerRuntime(Settings.from_config(load_config()))
        _runtime.prefetcher = None   # RQ's own worker may fork per job: a fetch ahead would die with it
    return _runtime


def run_service_job(*, jobName: str, worker: str, headers: dict, params: dict, added_params: dict,
                    event: dict, **extra: Any) -> Any:
    """The RQ job function: call the service's worker with the dcm-processor keywords + ours."""
    runtime = current_runtime()
    job = get_current_job()
    connection: redis.Redis = job.connection if job else redis.Redis.from_url(runtime.settings.redis_url)
    job_id = job.id if job else jobName
    func = runtime.resolve(worker)
    dcmpath = None
    try:
        if extra.get("batch") is not None:  # several instances in one job (scheduler/batching.py)
            extra["batch"], dcmpath = runtime.batch(extra["batch"], job_id)
        else:
            dcmpath = runtime.dcmpath(event, job_id)
        if runtime.prefetcher is not None and job is not None:   # this job has its files: the next one's now
            runtime.prefetcher.start(connection)
            if runtime.takes_ahead(worker, func):
                prefetcher = runtime.prefetcher
                extra[AHEAD] = lambda: next_job(prefetcher, runtime.cache, connection, job, worker)
        return func(jobName=jobName, headers=headers, params=params, added_params=added_params,
                    dcmpath=str(dcmpath) if dcmpath else None, event=event,
                    config=runtime.settings.config, connection=connection, **extra)
    finally:
        if dcmpath is not None and dcmpath.is_dir():
            runtime.cache.release(dcmpath)
        runtime.cache.sweep()
