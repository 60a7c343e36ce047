"""Workers of the built-in ChRIS service: store, register, finish a series (worker side)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import requests
from rq import get_current_job

from dicomflow import httpsession
from dicomflow.chris.errors import BatchItemsError
from dicomflow.chris.jobs import finish_series, instance_key, register_instance, store_batch, store_instance
from dicomflow.chris.settings import ChrisSettings
from dicomflow.errors import EventError
from worker.ahead import Claim

if TYPE_CHECKING:
    from rq.job import Job

    from worker.ahead import NextJob

log = logging.getLogger(__name__)

#: One kept connection to each CUBE per worker process, reused by its jobs: a job's first
#: registration used to open one (and CUBE a thread for it), ~10 ms a job (issue 23).
_SESSIONS: dict[str, requests.Session] = {}
#: The threads that keep a batch's registrations in flight, kept by the worker process too: a
#: pool per job started its threads at the job's first registration and joined them at its end,
#: while CUBE waited (issue 23). Keyed by CHRIS_REGISTRATIONS_IN_FLIGHT.
_REGISTRARS: dict[int, ThreadPoolExecutor] = {}
#: Head starts on the job this worker runs next (worker/ahead.py): (job id, instance key) ->
#: (when begun, the future of its store and registration). Taken by that job; forgotten after
#: AHEAD_KEPT seconds if it never comes to this worker (it then does its own work).
_AHEAD: dict[tuple[str, str], tuple[float, Future]] = {}
AHEAD_KEPT = 600.0
#: How many of the next job's instances are begun early: one keeps CUBE busy while this job
#: ends and the next one starts (~6 ms) and stores its second instance (~3 ms).
AHEAD_INSTANCES = 1


def _session(settings: ChrisSettings) -> requests.Session:
    """This process's session to `settings.url` (a dropped connection is reopened by urllib3)."""
    session = _SESSIONS.get(settings.url)
    if session is None:
        session = _SESSIONS[settings.url] = httpsession.session()
    return session


def _registrar(settings: ChrisSettings) -> ThreadPoolExecutor:
    """This process's registration threads, CHRIS_REGISTRATIONS_IN_FLIGHT of them."""
    pool = _REGISTRARS.get(settings.registrations_in_flight)
    if pool is None:
        pool = _REGISTRARS[settings.registrations_in_flight] = ThreadPoolExecutor(
            settings.registrations_in_flight, thread_name_prefix="chris-register")
    return pool


def store(jobName: str, headers: Mapping[str, Any], params: Mapping[str, Any],
          added_params: Mapping[str, Any], dcmpath: str, event: Mapping[str, Any],
          config: Mapping[str, str], connection: redis.Redis, batch: list[dict[str, Any]] | None = None,
          ahead: Callable[[], NextJob | None] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Write the instance into CUBE's storage at its cube.md path, then register it (CUBE 5).

    With `batch` (settings.json's `batchSize`), every instance of it; a retry of the job skips
    the instances an earlier attempt finished (kept in the job's meta). With `ahead` (the
    worker runtime's, worker/ahead.py), the next job's first instance is begun while this job
    waits for CUBE's last answers, so that CUBE does not idle between the two jobs."""
    settings = ChrisSettings.from_config(config)
    if batch is None:
        return store_instance(settings, connection, Path(dcmpath), event, register=True, session=_session(settings))
    job = get_current_job()
    done = set(job.meta.get("chrisDone", ())) if job is not None else set()
    items = [(Path(item["dcmpath"]), item["event"]) for item in batch]
    todo = [(path, ev) for path, ev in items if instance_key(ev, path.stem) not in done]
    registrar = _registrar(settings)
    started = _head_starts(settings, connection, job, todo, registrar)
    then = (lambda: _start_ahead(settings, connection, ahead(), registrar)) if ahead is not None else None
    try:
        result = store_batch(settings, connection, todo, register=True, session=_session(settings),
                             registrar=registrar, started=started, then=then)
    except BatchItemsError as exc:
        if job is not None:
            job.meta["chrisDone"] = sorted(done | set(exc.done))
            job.save_meta()
        raise
    result["skipped"] = len(items) - len(todo)
    return result


def _head_starts(settings: ChrisSettings, connection: redis.Redis, job: Job | None,
                 todo: list[tuple[Path, Mapping[str, Any]]], registrar: ThreadPoolExecutor) -> dict[str, Future]:
    """What was begun of this job before it started (instance key -> the future of its store and
    registration), and the job's claim on the rest (worker/ahead.py): from now on, no worker
    begins any of it early. What another process began is waited for in the registration
    threads (`_outcome_of`), not sent again."""
    if job is None:
        return {}
    started = _take_ahead(job.id)
    claim = Claim(connection, job)
    elsewhere = claim.take().begun   # begun by another process, or by this one and forgotten
    for path, event in todo:
        key = instance_key(event, path.stem)
        if key in elsewhere and key not in started:
            started[key] = registrar.submit(_outcome_of, settings, connection, claim, key, path, event)
    return started


def _outcome_of(settings: ChrisSettings, connection: redis.Redis, claim: Claim, key: str, path: Path,
                event: Mapping[str, Any]) -> dict[str, Any]:
    """The result of an instance another worker began early for this job: as it recorded it;
    done here if it failed there (its error is then this job's to report) or never says."""
    # As long as that worker can take to store and register it, with CUBE's retries.
    longest = (settings.http_timeout + settings.retry_cap) * settings.http_retries + 10
    outcome = claim.wait(key, longest)
    if outcome is not None and "result" in outcome:
        return outcome["result"]
    log.info("instance %s was begun early by another worker, which %s: doing it here", key,
             "failed" if outcome is not None else f"did not say how it went within {longest:.0f} s")
    return store_instance(settings, connection, path, event, register=True, session=_session(settings))


def _take_ahead(job_id: str) -> dict[str, Future]:
    """The head starts begun for job `job_id` (instance key -> future); forgets stale ones."""
    now = time.monotonic()
    mine = {}
    for (owner, key), (began, future) in list(_AHEAD.items()):
        if owner == job_id:
            mine[key] = future
            del _AHEAD[(owner, key)]
        elif now - began > AHEAD_KEPT:
            del _AHEAD[(owner, key)]
    return mine


def _start_ahead(settings: ChrisSettings, connection: redis.Redis, upcoming: NextJob | None,
                 registrar: ThreadPoolExecutor) -> None:
    """Begin the first AHEAD_INSTANCES instances of `upcoming` (the job this worker runs next)
    in the registration threads, behind this job's own registrations: stored and registered as
    that job would (idempotent), the outcome kept for it."""
    if upcoming is None:
        return
    done = set(upcoming.job.meta.get("chrisDone", ()))
    chosen: dict[str, tuple[Path, Mapping[str, Any]]] = {}
    for item in upcoming.items:
        if len(chosen) == AHEAD_INSTANCES:
            break
        path, event = Path(item["dcmpath"]), item["event"]
        key = instance_key(event, path.stem)
        if key not in done and (upcoming.job.id, key) not in _AHEAD:
            chosen[key] = (path, event)
    if not chosen:
        return
    claim = Claim(connection, upcoming.job)
    if not claim.take(list(chosen)).mine:   # its worker has started it, or another begins it
        return
    for key, (path, event) in chosen.items():
        future = registrar.submit(store_instance, settings, connection, path, event, register=True,
                                  session=_session(settings))
        future.add_done_callback(partial(_record, claim, key))
        _AHEAD[(upcoming.job.id, key)] = (time.monotonic(), future)


def _record(claim: Claim, key: str, future: Future) -> None:
    """Record the outcome of an instance begun early, for a worker that took its job meanwhile."""
    error = future.exception()
    outcome = {"result": future.result()} if error is None else {"error": f"{type(error).__name__}: {error}"}
    try:
        claim.record(key, outcome)
    except redis.RedisError as exc:   # that worker then does the instance itself, after its wait
        log.warning("could not record the outcome of %s, begun early: %s", key, exc)


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
