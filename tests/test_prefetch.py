"""worker/prefetch.py: a worker fetches the next queued job's files while its job runs (issue 23).

Real Redis, a real Orthanc (no plugin) holding the files, RQ's queues and a real worker.
"""

from __future__ import annotations

import pytest
from rq import Queue, SimpleWorker

from tests.support.services import job, make_service, settings_for
from worker import runtime
from worker.prefetch import Prefetcher

#: A service worker that waits (up to 20 s) for the files named in params to be in the cache.
WAITING_WORKER = '''
import time
from pathlib import Path

def worker(jobName, headers, params, added_params, **kwargs):
    deadline = time.monotonic() + 20
    while not all(Path(p).exists() for p in params.get("waitFor", [])):
        if time.monotonic() > deadline:
            return {"sawNextFiles": False}
        time.sleep(0.02)
    return {"sawNextFiles": True, "batch": len(kwargs.get("batch") or [])}
'''


@pytest.fixture()
def orthanc(plain_orthanc):
    return plain_orthanc


@pytest.fixture()
def settings(tmp_path, redis_url, services, orthanc):
    make_service(services, "w", job("wJob", "w"), worker_code=WAITING_WORKER)
    return settings_for(tmp_path, redis_url, services, ORTHANC_URL=orthanc.url,
                        ORTHANC_USERNAME=orthanc.username, ORTHANC_PASSWORD=orthanc.password)


def _stored(orthanc, sag_anon, count: int, start: int = 0) -> list[str]:
    files = sorted(sag_anon.glob("*.dcm"))[start:start + count]
    return [orthanc.post("/instances", f.read_bytes())["ID"] for f in files]


def _item(orthanc_id: str, level: str = "instance") -> dict:
    key = "instance" if level == "instance" else "instances"
    value = orthanc_id if level == "instance" else [orthanc_id]
    return {"headers": {}, "added_params": {}, "event": {"level": level, "orthanc": {key: value}}}


def _enqueue(queue: Queue, ids: list[str], params: dict | None = None, level: str = "instance"):
    items = [_item(i, level) for i in ids]
    batch = {"batch": items} if level == "instance" and len(items) > 1 else {}
    return queue.enqueue("worker.runtime.run_service_job", jobName="wJob", worker="w.worker", headers={},
                         params=params or {}, added_params={}, event=items[0]["event"], **batch)


def test_the_job_rq_hands_out_next_has_its_files_fetched(settings, connection, orthanc, sag_anon):
    cache_runtime = runtime.WorkerRuntime(settings)
    prefetcher = Prefetcher(cache_runtime.cache, settings.queues)
    ids = _stored(orthanc, sag_anon, 4)
    low = Queue("low", connection=connection)
    _enqueue(low, ids[3:])                              # behind the default queue's job
    _enqueue(Queue("default", connection=connection), ids[:3])
    assert prefetcher.start(connection)
    prefetcher.wait(30)
    cached = {p.stem for p in cache_runtime.cache.instances.glob("*.dcm")}
    assert cached == set(ids[:3]) and prefetcher.fetched == 3   # the head of the first non-empty queue only


def test_only_instance_jobs_are_fetched_ahead(settings, connection, orthanc, sag_anon):
    cache_runtime = runtime.WorkerRuntime(settings)
    prefetcher = Prefetcher(cache_runtime.cache, settings.queues)
    ids = _stored(orthanc, sag_anon, 2)
    high = Queue("high", connection=connection)
    _enqueue(high, ids[:1], level="series")            # a series job's folder may be large: not ahead
    _enqueue(high, ids[1:])
    prefetcher.start(connection)
    prefetcher.wait(30)
    assert prefetcher.fetched == 0 and not list(cache_runtime.cache.instances.glob("*.dcm"))
    high.empty()
    prefetcher.start(connection)                       # nothing queued: nothing to do, no error
    prefetcher.wait(30)
    assert prefetcher.fetched == 0


def test_a_worker_fetches_the_next_jobs_files_while_its_job_runs(settings, connection, orthanc, sag_anon,
                                                                monkeypatch):
    worker_runtime = runtime.WorkerRuntime(settings)
    monkeypatch.setattr(runtime, "_runtime", worker_runtime)
    ids = _stored(orthanc, sag_anon, 5)
    default = Queue("default", connection=connection)
    next_files = [str(worker_runtime.cache.instances / f"{i}.dcm") for i in ids[2:]]
    first = _enqueue(default, ids[:2], params={"waitFor": next_files})   # runs while the next is queued
    second = _enqueue(default, ids[2:])
    SimpleWorker([default], connection=connection).work(burst=True)
    assert first.return_value() == {"sawNextFiles": True, "batch": 2}
    assert second.return_value() == {"sawNextFiles": True, "batch": 3}
    assert worker_runtime.prefetcher.fetched == 3


def test_off_when_configured_or_for_fork_workers(tmp_path, redis_url, services):
    assert runtime.WorkerRuntime(settings_for(tmp_path, redis_url, services)).prefetcher is not None
    for extra in ({"DICOMFLOW_PREFETCH": "false"}, {"DICOMFLOW_WORKER_CLASS": "fork"}):
        assert runtime.WorkerRuntime(settings_for(tmp_path, redis_url, services, **extra)).prefetcher is None


def test_an_unreachable_orthanc_is_tried_once_ahead_not_for_the_retry_time(tmp_path, redis_url, services,
                                                                             connection):
    """A fetch ahead holds the file's lock while it tries: during an outage it gives up at
    once and leaves the waiting (DICOMFLOW_ORTHANC_RETRY_SECONDS) to the job that needs it."""
    from tests.support.procs import free_port

    settings = settings_for(tmp_path, redis_url, services, ORTHANC_URL=f"http://127.0.0.1:{free_port()}",
                            DICOMFLOW_ORTHANC_RETRY_SECONDS="60")
    cache_runtime = runtime.WorkerRuntime(settings)
    prefetcher = Prefetcher(cache_runtime.cache, settings.queues)
    _enqueue(Queue("default", connection=connection), ["0123abcd-0123abcd-0123abcd-0123abcd-00000001"])
    prefetcher.start(connection)
    prefetcher.wait(10)
    assert not prefetcher._thread.is_alive() and prefetcher.fetched == 0
