"""dicomflow's disk guard and retention policy, inside Orthanc's plugin (standard library only).

Orthanc's storage otherwise grows until the disk is full, and Orthanc 1.10 then fails half-way
("Cannot write to file", "Cannot flush the SQLite database to the disk"). Two parts:

**The watermark** (`DiskGuard`; ``"MinFreeSpaceMB"``, default 1024, 0 = off). A thread measures
the free space of Orthanc's ``StorageDirectory`` and ``IndexDirectory`` (the fuller of their
filesystems; ``statvfs`` ``f_bavail``) every ``"DiskCheckInterval"`` seconds (1). Between two
measures the C-STORE filter subtracts the size of each instance it accepts, so a fast sender
cannot run a second's worth of ingest past the watermark; the filter reads a flag and adds a
number, it never touches the disk. Once the free space (so estimated) is under the watermark,
every new instance is refused with the DIMSE status 0xA700 "Refused: Out of Resources" (the
instance that crossed it was the last one stored); storescu prints ``Received Store Response
(Refused: OutOfResources)``, ends the association and exits non-zero. Meanwhile REST uploads
(``POST /instances``, STOW-RS, modify/anonymize/merge/split, create-dicom, WebDAV ``PUT``) get
403 from the HTTP filter. Orthanc's log says when refusing starts and stops and why (free space
against the watermark, every minute while it lasts), and ``GET /dicomflow/status`` has a
``disk`` part (``refusing``, ``reason``, ``freeBytes``, ``estimatedFreeBytes``,
``minFreeBytes``, ``refused``: C-STOREs and uploads). Storing resumes at the first measure that
finds the watermark plus a margin free (5 % of it, at most 50 MB, so that the state does not
flap at the edge).

**Retention** (`Retention`; opt-in: ``"RetentionDays"``, default 0 = keep everything). A thread
deletes from Orthanc, every ``"RetentionInterval"`` seconds (3600), the studies whose
``LastUpdate`` (Orthanc's, in UTC) is at least RetentionDays old (fractions of a day allowed).
With ``"RetentionWaitForJobs"`` (true, the default) a study old enough goes only once every
service finished with it: the scheduler answers ``GET /api/v1/studies/<StudyInstanceUID>/jobs``
(``finished``: no job of the study's events queued, started, deferred, scheduled or failed);
a scheduler that cannot be asked keeps the study for the next pass. False: age alone. A study is never
deleted while an event about it (any level) is undelivered: in the plugin's spool, among its
dead letters (``/dicomflow/spool/retry`` can re-queue them) or in its in-memory queue. The
studies are read a page at a time (``GET /studies?expand``, 100 per page, a pause between
pages), at most `MAX_DELETIONS_PER_PASS` go per pass, and only RestApiGet and RestApiDelete are
used (4.0 leaks memory in RestApiPost and its siblings; 3000 GETs of a 50 KB page grew
Orthanc's memory by ~0.3 MB here). Status: the ``retention`` part of ``/dicomflow/status``.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import sqlite3
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

#: The DIMSE status of a refused C-STORE: "Refused: Out of Resources" (PS3.4 Annex B).
OUT_OF_RESOURCES = 0xA700
#: What Orthanc's C-STORE filter of orthanc-python 4.0 returns to store the instance (any other
#: positive value is the DIMSE status of the refusal; verified against Orthanc 1.10).
ACCEPT = 0
MB = 1024 * 1024
#: Orthanc's HttpMethod values of POST and PUT (the requests that can store data).
WRITE_METHODS = frozenset({2, 3})
#: REST routes that add DICOM instances to Orthanc's storage.
UPLOADS = re.compile(
    r"/(instances|tools/create-dicom|dicom-web/studies(/[^/]+)?"
    r"|(patients|studies|series|instances)/[^/]+/(modify|anonymize|merge|split)|webdav/.*)/?"
)
#: While refusing, how often the log repeats that it still refuses (s).
REMIND_EVERY = 60.0
#: Studies read per REST call by the retention walk, and its pause between pages (s).
RETENTION_PAGE = 100
RETENTION_PAUSE = 0.2
#: Deletions per retention pass at most (the next pass continues).
MAX_DELETIONS_PER_PASS = 500


def storage_paths(configuration: dict[str, Any], cwd: str | None = None) -> tuple[str, ...]:
    """The folders Orthanc writes its files and its index to (absolute, without repeats).

    Orthanc's defaults: ``StorageDirectory`` "OrthancStorage", ``IndexDirectory`` the same.
    A relative path is taken from Orthanc's working directory.
    """
    cwd = cwd or os.getcwd()
    storage = str(configuration.get("StorageDirectory") or "OrthancStorage")
    index = str(configuration.get("IndexDirectory") or storage)
    paths = []
    for path in (storage, index):
        path = os.path.normpath(os.path.join(cwd, path))
        if path not in paths:
            paths.append(path)
    return tuple(paths)


def free_bytes(paths: Iterable[str], statvfs: Callable[[str], Any] = os.statvfs) -> int:
    """The free bytes (for a non-root writer) of the fullest filesystem holding one of `paths`.

    A folder not created yet is measured at its nearest existing parent.
    """
    lowest = None
    for path in paths:
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        stats = statvfs(path)
        free = stats.f_bavail * stats.f_frsize
        lowest = free if lowest is None else min(lowest, free)
    if lowest is None:
        raise ValueError("no storage path to measure")
    return lowest


def _mb(value: float) -> str:
    return f"{value / MB:.1f} MB"


def _age(seconds: float) -> str:
    """A retention age for the log: days, or hours/seconds when shorter (tests use seconds)."""
    if seconds >= 86400:
        return f"{seconds / 86400:g} days"
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds:g} s"


class DiskGuard:
    """Refuses new instances while Orthanc's storage has less than `min_free` bytes free.

    Args:
        paths: Orthanc's storage and index folders.
        min_free: the watermark (bytes).
        interval: seconds between two samples of the free space.
        log: where transitions are written (Orthanc's LogWarning).
        statvfs: `os.statvfs` (tests pass a fake).
    """

    def __init__(self, paths: Iterable[str], min_free: int, interval: float = 1.0,
                 log: Callable[[str], Any] = print, statvfs: Callable[[str], Any] = os.statvfs):
        self.paths = tuple(paths)
        self.min_free = int(min_free)
        self.interval = interval
        self._log = log
        self._statvfs = statvfs
        #: How far above the watermark the free space must be to accept instances again.
        self.resume_margin = min(self.min_free // 20, 50 * MB)
        self._lock = threading.Lock()
        self._state_lock = threading.Lock()
        #: Free bytes at the last sample, and the bytes of the instances accepted since.
        self._free: int | None = None
        self._accepted = 0
        #: Read by the filters on every instance/request: the only per-instance work while refusing.
        self.refusing = False
        self.reason: str | None = None
        self.refused = 0
        self.refusing_since: float | None = None
        self._refused_at_start = 0
        self._reminded = 0.0
        self.last_check: float | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dicomflow-disk", daemon=True)

    # ---- the sampler (its own thread) ------------------------------------------------

    def sample(self) -> int:
        """Measure the free space now; start or stop refusing accordingly. Returns the free bytes."""
        with self._lock:
            counted = self._accepted
        free = free_bytes(self.paths, self._statvfs)  # outside the lock: the filter never waits on the disk
        with self._lock:
            # What was accepted before the measure is in it (or about to be: one instance per
            # association at most); what was accepted while measuring stays counted.
            self._accepted -= counted
            self._free = free
            self.last_check = time.time()
            estimate = free - self._accepted
        # Once refusing, a little more than the watermark must be free again: the estimate and
        # the index's own growth would otherwise flip the state back and forth at the edge.
        self._set(estimate < self.min_free + (self.resume_margin if self.refusing else 0), estimate)
        return free

    def _set(self, refusing: bool, estimate: int) -> None:
        with self._state_lock:  # the sampler and every association's filter may get here at once
            self._transition(refusing, estimate)

    def _transition(self, refusing: bool, estimate: int) -> None:
        now = time.time()
        watermark = f"MinFreeSpaceMB={self.min_free / MB:g}"
        if refusing:
            where = f"{_mb(estimate)} free in {', '.join(self.paths)}"
            self.reason = (f"{where}, under the watermark {watermark}" if estimate < self.min_free else
                           f"{where}, not yet the {_mb(self.min_free + self.resume_margin)} to resume "
                           f"({watermark} plus a margin)")
        if refusing and not self.refusing:
            self.refusing, self.refusing_since, self._reminded = True, now, now
            self._refused_at_start = self.refused
            self._log(f"dicomflow: disk guard: {self.reason}: refusing C-STOREs (0xA700 Out of Resources) "
                      "and REST uploads (403) until space is freed")
        elif not refusing and self.refusing:
            self.refusing = False
            self._log(f"dicomflow: disk guard: {_mb(estimate)} free, above {watermark}: "
                      f"accepting instances again ({self.refused - self._refused_at_start} refused "
                      f"in {now - (self.refusing_since or now):.0f} s)")
            self.refusing_since, self.reason = None, None
        elif refusing and now - self._reminded >= REMIND_EVERY:
            self._reminded = now
            self._log(f"dicomflow: disk guard: still refusing: {self.reason} "
                      f"({self.refused - self._refused_at_start} refused so far)")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - the sampler must outlive a failed measure
                message = f"{type(exc).__name__}: {exc}"
                if message != self.last_error:
                    self._log(f"dicomflow: disk guard cannot measure the free space: {message}")
                self.last_error = message
            self._stop.wait(self.interval)

    def start(self) -> DiskGuard:
        """Take a first sample (the filters know the state from the first instance on), then sample
        every `interval` in a thread."""
        try:
            self.sample()
        except (OSError, ValueError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + 5)

    # ---- Orthanc's filters (Orthanc's threads) -----------------------------------------

    def cstore_filter(self, dicom: Any) -> int:
        """orthanc-python 4.0's incoming C-STORE filter: 0 stores, OUT_OF_RESOURCES refuses."""
        try:
            if not self.refusing:
                size = dicom.GetInstanceSize()
                with self._lock:
                    free = self._free
                    if free is None or free - self._accepted >= self.min_free:
                        self._accepted += size
                        return ACCEPT
                    estimate = free - self._accepted
                self._set(True, estimate)  # under the watermark since the last sample
            with self._lock:
                self.refused += 1
            return OUT_OF_RESOURCES
        except Exception as exc:  # noqa: BLE001 - never raise into Orthanc's ingest: store, say why
            self.last_error = f"C-STORE filter: {type(exc).__name__}: {exc}"
            return ACCEPT

    def http_filter(self, uri: str, method: Any = None, **_request: Any) -> bool:
        """orthanc-python 4.0's incoming HTTP request filter: False (Orthanc answers 403) for an
        upload while refusing."""
        if not self.refusing:
            return True
        try:
            if int(method) in WRITE_METHODS and UPLOADS.fullmatch(uri):
                with self._lock:
                    self.refused += 1
                return False
        except Exception as exc:  # noqa: BLE001 - never raise into Orthanc's HTTP server
            self.last_error = f"HTTP filter: {type(exc).__name__}: {exc}"
        return True

    def status(self) -> dict[str, Any]:
        with self._lock:
            free, accepted = self._free, self._accepted
        return {
            "enabled": True,
            "paths": list(self.paths),
            "minFreeBytes": self.min_free,
            "freeBytes": free,
            "estimatedFreeBytes": None if free is None else free - accepted,
            "refusing": self.refusing,
            "reason": self.reason,
            "refusingSince": self.refusing_since,
            "refused": self.refused,
            "lastCheck": self.last_check,
            "checkInterval": self.interval,
            "lastError": self.last_error,
        }


# ---- retention ------------------------------------------------------------------------------


def last_update(study: dict[str, Any]) -> float | None:
    """The study's LastUpdate (Orthanc writes it in UTC, ``YYYYMMDDTHHMMSS``) as a Unix time."""
    text = study.get("LastUpdate")
    try:
        return float(calendar.timegm(time.strptime(str(text), "%Y%m%dT%H%M%S")))
    except (TypeError, ValueError):
        return None


def spooled_ids(spool_path: str) -> tuple[set[str], set[str]]:
    """Orthanc ids with an event in the plugin's spool or its dead letters, read without the
    plugin's connection (SQLite's WAL lets a reader in beside the writer).

    Returns (study ids, other ids): every built event names its study (``orthanc.study``); an
    event that could not be built keeps the resource id it was about (any level).
    """
    if not os.path.exists(spool_path):
        return set(), set()
    db = sqlite3.connect(f"file:{spool_path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT json_extract(event, '$.orthanc.study'), json_extract(event, '$.unprocessed[2]') FROM spool"
            " UNION SELECT json_extract(event, '$.orthanc.study'), json_extract(event, '$.unprocessed[2]') FROM dead"
        ).fetchall()
    finally:
        db.close()
    studies = {study for study, _ in rows if isinstance(study, str)}
    others = {other for study, other in rows if study is None and isinstance(other, str)}
    return studies, others


class Retention:
    """Deletes from Orthanc the studies older than `max_age` whose events are all delivered.

    Args:
        api: Orthanc's module (RestApiGet, RestApiDelete).
        max_age: seconds since a study's LastUpdate before it may go.
        interval: seconds between two passes.
        undelivered: () -> (study ids, ids of other levels) with an undelivered event.
        finished: optional (expanded study) -> whether every service finished with it; None: age only.
        log: where deletions are reported (Orthanc's LogWarning).
    """

    def __init__(self, api: Any, max_age: float, interval: float,
                 undelivered: Callable[[], tuple[set[str], set[str]]],
                 finished: Callable[[dict[str, Any]], bool] | None = None,
                 log: Callable[[str], Any] = print, clock: Callable[[], float] = time.time):
        self.api = api
        self.max_age = max_age
        self.interval = interval
        self._undelivered = undelivered
        self._finished = finished
        self._log = log
        self._clock = clock
        self.counters = {"passes": 0, "deleted": 0, "keptUndelivered": 0, "keptUnfinished": 0, "errors": 0}
        self.last_pass: float | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dicomflow-retention", daemon=True)

    def run_once(self) -> int:
        """One pass over every study; returns how many were deleted."""
        now = self._clock()
        pending: tuple[set[str], set[str]] | None = None
        since = deleted = 0
        while not self._stop.is_set() and deleted < MAX_DELETIONS_PER_PASS:
            page = json.loads(self.api.RestApiGet(f"/studies?expand&since={since}&limit={RETENTION_PAGE}"))
            gone = 0
            for study in page:
                updated = last_update(study)
                if updated is None or now - updated < self.max_age:
                    continue
                if pending is None:
                    pending = self._undelivered()  # once per pass, and only when a study is old enough
                if self._is_pending(study, *pending):
                    self.counters["keptUndelivered"] += 1
                    continue
                if self._finished is not None and not self._finished(study):
                    self.counters["keptUnfinished"] += 1
                    continue
                try:
                    self.api.RestApiDelete(f"/studies/{study['ID']}")
                except Exception as exc:  # noqa: BLE001 - deleted meanwhile, or Orthanc refused: next pass
                    self.counters["errors"] += 1
                    self.last_error = f"deleting study {study['ID']}: {type(exc).__name__}: {exc}"
                    continue
                gone += 1
                deleted += 1
                if deleted >= MAX_DELETIONS_PER_PASS:
                    break
            # The studies after a deleted one move up in Orthanc's list.
            since += len(page) - gone
            if len(page) < RETENTION_PAGE:
                break
            self._stop.wait(RETENTION_PAUSE)
        self.counters["passes"] += 1
        self.counters["deleted"] += deleted
        self.last_pass = now
        if deleted:
            self._log(f"dicomflow: retention deleted {deleted} studies last updated over {_age(self.max_age)} ago")
        return deleted

    def _is_pending(self, study: dict[str, Any], studies: set[str], others: set[str]) -> bool:
        """Whether an undelivered event is about the study, one of its series or instances."""
        if study["ID"] in studies or others.intersection(study.get("Series") or ()):
            return True
        if not others:
            return False
        instances = json.loads(self.api.RestApiGet(f"/studies/{study['ID']}/instances"))
        return any(instance.get("ID") in others for instance in instances)

    def _run(self) -> None:
        # The first pass after one interval (at most a minute): Orthanc finishes starting meanwhile.
        delay = min(self.interval, 60.0)
        while not self._stop.wait(delay):
            delay = self.interval
            try:
                self.run_once()
            except Exception as exc:  # noqa: BLE001 - Orthanc still starting, or a REST error: next pass
                self.counters["errors"] += 1
                self.last_error = f"{type(exc).__name__}: {exc}"

    def start(self) -> Retention:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "maxAgeDays": self.max_age / 86400,
            "interval": self.interval,
            "condition": "age" if self._finished is None else "age+finished",
            **self.counters,
            "lastPass": self.last_pass,
            "lastError": self.last_error,
        }


def scheduler_finished(base_url: str, token: str, timeout: float = 10.0) -> Callable[[dict[str, Any]], bool]:
    """(expanded study) -> whether the scheduler says every job of the study's events finished;
    False (keep it) when the study has no StudyInstanceUID or the scheduler cannot be asked."""
    base = base_url.rstrip("/")

    def finished(study: dict[str, Any]) -> bool:
        uid = str((study.get("MainDicomTags") or {}).get("StudyInstanceUID") or "").strip()
        if not uid:
            return False
        request = urllib.request.Request(f"{base}/api/v1/studies/{urllib.parse.quote(uid, safe='')}/jobs",
                                         headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return json.load(answer).get("finished") is True
        except (OSError, ValueError):
            return False
    return finished


# ---- the plugin's part ------------------------------------------------------------------------


def install(api: Any, settings: Any, queued: Callable[[], Iterable[str]]) -> tuple[DiskGuard | None, Retention | None]:
    """Start the disk guard and the retention policy as `settings` (the plugin's) configure them.

    Args:
        api: Orthanc's module (filters are registered with it, its REST API is used, it logs).
        settings: the plugin's PluginSettings.
        queued: () -> the Orthanc ids of the items in the plugin's in-memory queue.

    Returns:
        (the guard or None when MinFreeSpaceMB is 0, the retention or None when RetentionDays is 0)
    """
    guard = retention = None
    if settings.min_free_space_mb > 0:
        guard = DiskGuard(settings.storage_paths, int(settings.min_free_space_mb * MB),
                          settings.disk_check_interval, api.LogWarning).start()
        api.RegisterIncomingCStoreInstanceFilter(guard.cstore_filter)
        api.RegisterIncomingHttpRequestFilter(guard.http_filter)
        free = guard.status()["freeBytes"]
        api.LogWarning(f"dicomflow: disk guard: new instances are refused under {_mb(guard.min_free)} free in "
                       f"{', '.join(guard.paths)} ({'unknown' if free is None else _mb(free)} free now)")
    if settings.retention_days > 0:
        def undelivered() -> tuple[set[str], set[str]]:
            studies, others = spooled_ids(settings.spool_path)
            others.update(queued())
            return studies, others

        finished = (scheduler_finished(settings.scheduler_url, settings.token)
                    if settings.retention_wait_for_jobs else None)
        retention = Retention(api, settings.retention_days * 86400, settings.retention_interval, undelivered,
                              finished=finished, log=api.LogWarning).start()
        api.LogWarning(f"dicomflow: retention: studies last updated over {_age(retention.max_age)} ago are deleted "
                       f"from Orthanc (a pass every {retention.interval:g} s) once none of their events waits for "
                       "delivery" + (" and every job of them finished" if finished else ""))
    return guard, retention


def status(guard: DiskGuard | None, retention: Retention | None) -> dict[str, Any]:
    """The ``disk`` and ``retention`` parts of the plugin's status route."""
    return {"disk": guard.status() if guard else {"enabled": False, "minFreeBytes": 0},
            "retention": retention.status() if retention else {"enabled": False}}
