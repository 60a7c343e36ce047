"""The three ChRIS jobs: store an instance, register it (CUBE 5), finish a series (register / mark it)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import redis
import requests

from dicomflow.chris.client import ChrisClient
from dicomflow.chris.errors import (
    BatchItemsError,
    ChrisError,
    ChrisRequestError,
    ChrisUnavailableError,
    InvalidTagError,
    SeriesIncompleteError,
)
from dicomflow.chris.instance import read_instance_tags
from dicomflow.chris.lonk import LonkNotifier
from dicomflow.chris.markers import (
    ATTEMPTED_PUSH_COUNT,
    NUMBER_OF_SERIES_RELATED_INSTANCES,
    marker_fields,
    marker_path,
)
from dicomflow.chris.metadata import check_pacs_name, registration_fields
from dicomflow.chris.paths import instance_path, pacs_component
from dicomflow.chris.progress import SeriesProgress
from dicomflow.chris.settings import ChrisSettings, Registration
from dicomflow.chris.store import count_dicom_files, storage_target, write_empty, write_file
from dicomflow.dicomtags import clean_value
from dicomflow.errors import MissingTagError

log = logging.getLogger(__name__)
#: How often a series job looks at the counters while it waits for its instances.
POLL_INTERVAL = 0.1
#: Series registrations retried at once when files appeared while CUBE counted them.
SERIES_RECOUNTS = 3


def pacs_name_for(settings: ChrisSettings, event: Mapping[str, Any]) -> str:
    """CHRIS_PACS_NAME, else the sender's calling AE title (as oxidicom).

    Raises:
        InvalidTagError: neither is set.
    """
    name = settings.pacs_name or str(event.get("remoteAet") or "").strip()
    if not name:
        raise InvalidTagError("pacs_name", "", "is unknown: set CHRIS_PACS_NAME or send with a calling AE title")
    return name


def progress_pacs(settings: ChrisSettings, event: Mapping[str, Any]) -> str:
    """The pacs_name a series' progress is kept under (as in its storage path); "unknown" when
    there is none (the error is recorded there)."""
    try:
        return pacs_component(pacs_name_for(settings, event)) or "unknown"
    except InvalidTagError:
        return "unknown"


def instance_key(event: Mapping[str, Any], sop_uid: str) -> str:
    """How series jobs recognise an instance: Orthanc's instance id, else the SOPInstanceUID."""
    return str((event.get("orthanc") or {}).get("instance") or sop_uid)


def _announced(tags: Mapping[str, Any]) -> int | None:
    value = clean_value(tags.get("NumberOfSeriesRelatedInstances"))
    return int(value) if value is not None and value.isdigit() else None


def _notifier(settings: ChrisSettings, connection: redis.Redis) -> LonkNotifier:
    return LonkNotifier(settings.nats_url, connection, settings.progress_interval)


def store_instance(settings: ChrisSettings, connection: redis.Redis, dcmpath: Path,
                   event: Mapping[str, Any], register: bool = False,
                   session: requests.Session | None = None) -> dict[str, Any]:
    """Write one instance under CHRIS_FILES_ROOT at its cube.md path and count it; with
    `register`, then register it (CUBE 5's pacsfiles API; nothing more in series mode), over
    `session` if given (kept by the caller across jobs: no new connection per job).

    One job for both steps, storage first: a file CUBE refuses stays in storage, and a retry
    writes it again (atomically, the same bytes) before registering. As two jobs, every
    registration waited behind the store jobs queued before it and paid a second job's
    overhead and tag reading (issue 23; `bench/chris_rate.py`).

    Raises:
        MissingTagError: a required tag is missing (recorded for the series when it is known).
        InvalidTagError: the PACS name is unusable.
        StorageWriteError: the file cannot be read or written.
        ChrisRequestError, ChrisUnavailableError: with `register`, CUBE refused or did not answer.
    """
    result, tags, info = _store(settings, connection, dcmpath, event)
    if register:
        with ChrisClient(settings, connection, session=session) as client:
            result.update(register_instance(settings, connection, dcmpath, event, tags=tags, info=info,
                                            client=client))
    return result


def store_batch(settings: ChrisSettings, connection: redis.Redis,
                items: Sequence[tuple[Path, Mapping[str, Any]]], register: bool = True,
                session: requests.Session | None = None, registrar: Executor | None = None,
                started: Mapping[str, Future] | None = None, then: Callable[[], None] | None = None,
                ) -> dict[str, Any]:
    """Store (and with `register`, register) several instances: a `batchSize` job; CUBE is
    asked over `session` if given, from the threads of `registrar` if given (both kept by the
    caller across jobs: no new connection, no new threads per job).

    `started`: instance key -> the future of `store_instance(..., register=True)` for items
    begun before the job (a head start, services/modules/chris): their outcome is taken from it.
    `then`: called once every item is stored and its registration sent, while the job waits
    for CUBE's answers (to give CUBE the next job's first registration before it idles).

    The local work for an instance (read its tags, write the file, count it) runs while CUBE
    answers the registrations before it, which run in threads beside the job, up to
    CHRIS_REGISTRATIONS_IN_FLIGHT at once: CUBE's round trip no longer adds to the worker's own
    time, and with two in flight CUBE has the next registration while it answers one (issue 23).
    Every instance is tried; those that failed are named in
    `BatchItemsError` (the job is retried as a whole; each step is idempotent).

    Returns:
        `{"instances": n, "stored": k, "registered": m, "results": {instance key: result}}`.

    Raises:
        BatchItemsError: some instances failed (`.done` holds the keys of those that did not).
    """
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    unavailable = threading.Event()

    def register_one(dcmpath: Path, event: Mapping[str, Any], tags: Mapping[str, Any], info: dict[str, str]) -> dict:
        # Once CUBE did not answer, the others would each wait CHRIS_HTTP_TIMEOUT for nothing:
        # the job fails, and RQ's retry registers them (their files are stored).
        if unavailable.is_set():
            raise ChrisUnavailableError("POST", settings.url + "pacsfiles/", 0,
                                        "not tried: CUBE was unavailable for an earlier instance of this batch")
        try:
            return register_instance(settings, connection, dcmpath, event, tags=tags, info=info, client=client)
        except ChrisUnavailableError:
            unavailable.set()
            raise

    own = registrar is None
    if registrar is None:
        registrar = ThreadPoolExecutor(settings.registrations_in_flight, thread_name_prefix="chris-register")
    with ChrisClient(settings, connection, session=session) as client, \
            (registrar if own else contextlib.nullcontext(registrar)):
        pending: list[tuple[str, Future]] = []
        mode = None
        try:
            early = dict(started or {})
            for dcmpath, event in items:
                key = instance_key(event, Path(dcmpath).stem)
                if key in early:   # begun before the job: its store and registration are under way
                    results[key] = {}
                    pending.append((key, early.pop(key)))
                    continue
                try:
                    result, tags, info = _store(settings, connection, Path(dcmpath), event)
                    results[key] = result
                    if register and mode is None:
                        mode = client.detect_registration()  # cached in Redis: one GET at most
                    if register and mode is Registration.PACSFILES:
                        pending.append((key, registrar.submit(register_one, Path(dcmpath), event, tags, info)))
                except (MissingTagError, ChrisError) as exc:
                    failures[key] = str(exc)
            if then is not None:
                _hint(then)
            for key, future in pending:
                try:
                    results[key].update(future.result())
                except (MissingTagError, ChrisError) as exc:
                    failures[key] = str(exc)
        finally:
            # Whatever ends the job (an error of another kind, its timeout), none of its
            # registrations runs on after it in the kept threads.
            wait([future for _, future in pending])
    if failures:
        raise BatchItemsError(failures, done=[k for k in results if k not in failures])
    registered = sum(1 for r in results.values() if "registered" in r)
    return {"instances": len(items), "stored": len(results), "registered": registered, "results": results}


def _hint(then: Callable[[], None]) -> None:
    """Run `then`, which only starts work early: whatever it raises is logged, the job goes on."""
    try:
        then()
    except Exception:  # noqa: BLE001 - a head start is an optimisation; the job it was for does its own work
        log.exception("starting on the next job early failed (it will do its own work)")


def _store(settings: ChrisSettings, connection: redis.Redis, dcmpath: Path,
           event: Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any], dict[str, str]]:
    """The store step: (its result, the instance's tags, its series' progress facts)."""
    tags = read_instance_tags(dcmpath)
    series_uid = clean_value(tags.get("SeriesInstanceUID"))
    sop_uid = clean_value(tags.get("SOPInstanceUID")) or Path(dcmpath).stem
    key = instance_key(event, sop_uid)
    notifier = _notifier(settings, connection)
    pacs = ""
    try:
        pacs = pacs_name_for(settings, event)
        location = instance_path(tags, pacs)
        pacs = check_pacs_name(location.pacs_name)
        progress = SeriesProgress(connection, pacs, series_uid) if series_uid else None
        write_file(Path(dcmpath), settings.files_root, location.path)
    except (MissingTagError, ChrisError) as exc:
        if series_uid:
            SeriesProgress(connection, progress_pacs(settings, event), series_uid).failed(key, str(exc))
            notifier.error(pacs or "unknown", series_uid, f"{sop_uid}: {exc}")
            notifier.flush()
        raise
    assert progress is not None  # SeriesInstanceUID is required by instance_path
    count, new, info = progress.stored(key, sop_uid, pacs, location.series_folder, _announced(tags))
    notifier.progress(pacs, series_uid, count)
    result: dict[str, Any] = {"path": location.path, "stored": count}
    if new and "registeredCount" in info and count > int(info["registeredCount"]):
        # Series mode: CUBE registered this series before this instance came; it cannot be
        # added to a registered series, so it is reported rather than silently lost.
        extra = count - int(info["registeredCount"])
        progress.grown(extra)
        message = (f"series grew after registration: {extra} instance(s) stored but not in CUBE "
                   f"({location.path})")
        log.warning(message)
        notifier.error(pacs, series_uid, message)
        result["grownAfterRegistration"] = extra
    notifier.flush()
    return result, tags, info


def register_instance(settings: ChrisSettings, connection: redis.Redis, dcmpath: Path,
                      event: Mapping[str, Any], tags: Mapping[str, Any] | None = None,
                      info: Mapping[str, str] | None = None, client: ChrisClient | None = None) -> dict[str, Any]:
    """Register one stored instance with CUBE 5's pacsfiles API (nothing to do in series mode).

    `tags` and `info` (its series' progress facts) as the store step just read them, if it did;
    `client` to reuse one (its connection to CUBE) across instances, else one of its own.

    Raises:
        MissingTagError, InvalidTagError: the tags cannot make a valid registration.
        ChrisRequestError: CUBE refused it.
        ChrisUnavailableError: CUBE did not answer within CHRIS_HTTP_RETRIES attempts.
    """
    tags = read_instance_tags(dcmpath) if tags is None else tags
    sop_uid = clean_value(tags.get("SOPInstanceUID")) or Path(dcmpath).stem
    location = instance_path(tags, pacs_name_for(settings, event))
    series_uid = str(clean_value(tags.get("SeriesInstanceUID")))
    progress = SeriesProgress(connection, location.pacs_name, series_uid)
    key = instance_key(event, sop_uid)
    notifier = _notifier(settings, connection)
    with (contextlib.nullcontext(client) if client is not None else ChrisClient(settings, connection)) as client:
        try:
            if client.detect_registration() is not Registration.PACSFILES:
                return {"skipped": "CUBE registers per series (series mode)"}
            fields = registration_fields(tags, location.pacs_name)
            fields["path"] = location.path
            outcome = client.register_file(fields)
            facts = progress.info() if info is None else info
            attempt = facts.get("attempt")
            if attempt and f"marker:{NUMBER_OF_SERIES_RELATED_INSTANCES}:{attempt}" not in facts \
                    and not progress.has_marker(attempt, NUMBER_OF_SERIES_RELATED_INSTANCES):
                # Idempotent (same path per attempt, locked, "already registered" is success),
                # so it is remembered only once CUBE has it: a failure here is retried.
                announced = _announced(tags)
                _register_marker(client, settings, fields, location.series_folder, attempt,
                                 NUMBER_OF_SERIES_RELATED_INSTANCES,
                                 str(announced) if announced is not None else "unknown")
                progress.marked(attempt, NUMBER_OF_SERIES_RELATED_INSTANCES)
        except (MissingTagError, ChrisError) as exc:
            # Recorded for the series' progress (and LONK), then raised: the job fails visibly.
            progress.failed(key, str(exc))
            notifier.error(location.pacs_name, series_uid, f"{sop_uid}: {exc}")
            notifier.flush()
            raise
    registered = progress.registered(key, sop_uid)
    return {"path": location.path, "created": outcome.created, "registered": registered}


def _register_marker(client: ChrisClient, settings: ChrisSettings, series_fields: Mapping[str, Any],
                     folder: str, attempt: str, key: str, value: str) -> None:
    """Write an empty marker file and register it under the pseudo-PACS org.fnndsc.oxidicom."""
    write_empty(settings.files_root, marker_path(folder, attempt, key, value))
    client.register_file(marker_fields(series_fields, folder, attempt, key, value))


def _expected_instances(dcmpath: Path, event: Mapping[str, Any]) -> list[str]:
    """The instances a series event covers: Orthanc's ids from the event, else the folder's files."""
    ids = (event.get("orthanc") or {}).get("instances")
    if ids:
        return [str(i) for i in ids]
    return sorted(p.stem for p in Path(dcmpath).glob("*.dcm"))


def _wait(progress: SeriesProgress, keys: list[str], registration: bool, timeout: float) -> None:
    """Poll the Redis counters until every key is settled.

    Raises:
        SeriesIncompleteError: still unsettled after `timeout` seconds (the job is retried).
    """
    deadline = time.monotonic() + timeout
    while pending := progress.pending(keys, registration):
        if time.monotonic() >= deadline:
            what = "registered" if registration else "stored"
            raise SeriesIncompleteError(
                f"series {progress.series_uid}: {len(pending)} of {len(keys)} instance(s) not "
                f"{what} after {timeout:.0f}s (first: {pending[0]})")
        time.sleep(POLL_INTERVAL)


def _first_file(folder: Path) -> Path | None:
    return min(folder.rglob("*.dcm"), default=None)


def finish_series(settings: ChrisSettings, connection: redis.Redis, dcmpath: Path,
                  event: Mapping[str, Any], series_uid: str) -> dict[str, Any]:
    """Once per stable series: wait for its instance jobs, then register it (series mode) or
    write the oxidicom marker files (pacsfiles mode); then LONK done.

    Raises:
        SeriesIncompleteError: instance jobs still running after CHRIS_SERIES_WAIT seconds.
        ChrisRequestError, ChrisUnavailableError: CUBE refused or did not answer.
    """
    progress = SeriesProgress(connection, progress_pacs(settings, event), series_uid)
    keys = _expected_instances(dcmpath, event)
    notifier = _notifier(settings, connection)
    with ChrisClient(settings, connection) as client:
        mode = client.detect_registration()
        _wait(progress, keys, registration=mode is Registration.PACSFILES, timeout=settings.series_wait)
        info = progress.info()
        stored, registered, errors = progress.counts()
        result: dict[str, Any] = {"mode": mode.value, "attempted": len(keys), "stored": stored,
                                  "errors": errors}
        if "path" not in info:
            # Nothing of this series could be stored: nothing to register; say so.
            notifier.error(pacs_name_for(settings, event), series_uid, "no instance of the series was stored")
            notifier.done(pacs_name_for(settings, event), series_uid)
            notifier.flush()
            progress.finish(len(keys))
            return result
        pacs, folder = info["pacs_name"], info["path"]
        sample = _first_file(storage_target(settings.files_root, folder))
        if sample is None:
            raise SeriesIncompleteError(f"series {series_uid}: no .dcm file in {folder}")
        fields = registration_fields(read_instance_tags(sample), pacs)
        try:
            if mode is Registration.SERIES:
                result.update(_register_series(client, settings, progress, fields, folder))
            else:
                attempt = info.get("attempt")
                if attempt:
                    _register_marker(client, settings, fields, folder, attempt, ATTEMPTED_PUSH_COUNT,
                                     str(len(keys)))
                result["registered"] = registered
        except ChrisError as exc:
            notifier.error(pacs, series_uid, str(exc))
            notifier.flush()
            raise
    stored, _, errors = progress.counts()
    notifier.progress(pacs, series_uid, stored, force=True)
    if errors:
        notifier.error(pacs, series_uid, f"{errors} instance(s) of the series failed; see its progress")
    notifier.done(pacs, series_uid)
    notifier.flush()
    progress.finish(len(keys))
    return result


def _register_series(client: ChrisClient, settings: ChrisSettings, progress: SeriesProgress,
                     fields: dict[str, Any], folder: str) -> dict[str, Any]:
    """POST the series folder with ndicom = the .dcm files in it; recount if files came meanwhile."""
    target = storage_target(settings.files_root, folder)
    previous = progress.info().get("registeredCount")
    for attempt in range(1, SERIES_RECOUNTS + 1):
        ndicom = count_dicom_files(target)
        try:
            outcome = client.register_series({**fields, "path": folder, "ndicom": ndicom})
        except ChrisRequestError as exc:
            # A file written while CUBE counted makes it answer 400 at once: count again.
            if attempt < SERIES_RECOUNTS and exc.status == 400 and count_dicom_files(target) != ndicom:
                continue
            raise
        break
    if outcome.created or previous is None:
        progress.series_registered(ndicom)
    elif ndicom > int(previous):
        progress.grown(ndicom - int(previous))
    return {"registered": ndicom if outcome.created or previous is None else int(previous),
            "created": outcome.created, "path": folder}
