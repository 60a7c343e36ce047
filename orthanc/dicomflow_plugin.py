"""dicomflow's Orthanc plugin: hands every stored instance and stable series/study to the scheduler.

Runs in Orthanc's embedded CPython (Debian's 3.11, orthanc-python 4.0 or newer): standard
library only. The on-stored callback captures the instance's bytes and context, puts them
on a bounded in-memory queue and returns; one sender thread has a builder process
(``dicomflow_builder.py``) turn them into events outside Orthanc's interpreter, delivers
them in batches (``POST {"events": [...]}`` with a bearer token) and keeps what it cannot
deliver in a durable SQLite spool, re-sent in reception order. Stable series/studies come
from ``dicomflow_stable.lua`` (Orthanc's Lua engine, through the route
``/dicomflow/stable/{series,study}``), or from Orthanc's change log without it. Settings: the
``"Dicomflow"`` section of Orthanc's configuration (README, "The Orthanc plugin").
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import re
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import orthanc

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from dicomflow_builder import BuilderError, BuilderProcess  # noqa: E402 - beside this script
from dicomflow_delivery import Delivery, DeliveryError, batch_body  # noqa: E402
from dicomflow_events import EventBuilder, computed_ids, instance_event, select_headers, to_json  # noqa: E402
from dicomflow_settings import CHANGES as _CHANGES  # noqa: E402
from dicomflow_settings import JSON as _JSON  # noqa: E402
from dicomflow_settings import LUA as _LUA  # noqa: E402
from dicomflow_settings import OFF as _OFF  # noqa: E402
from dicomflow_settings import RAW as _RAW  # noqa: E402
from dicomflow_settings import STABLE_SOURCES as _STABLE_SOURCES  # noqa: E402
from dicomflow_settings import PluginSettings  # noqa: E402
from dicomflow_spool import Spool  # noqa: E402

#: Answers that will not improve by sending the same batch again: dead letters.
REJECTED = frozenset({400, 401, 403, 404, 405, 413, 422})

_KIND_INSTANCE = "instance"
#: An instance re-read from Orthanc at start: stored before a crash, never handed over.
_KIND_REPLAY = "replay"
#: Orthanc change types the catch-up turns into events again.
_REPLAYED_CHANGES = {"NewInstance": _KIND_REPLAY, "StableSeries": "series", "StableStudy": "study"}
#: Orthanc change types the change reader turns into events while Orthanc runs.
_STABLE_CHANGES = {"StableSeries": "series", "StableStudy": "study"}
#: Changes read from Orthanc's log per REST call.
_CHANGES_PAGE = 1000
#: Orthanc's answer to API calls while it is still initialising (the sender starts with the plugin).
_NOT_YET = 2038
#: At start: how long after its change is logged an on-stored callback (run by Orthanc right
#: after the commit, in the same thread) has surely queued its event (s).
START_GRACE = 1.0
#: An Orthanc resource id (a SHA-1 in five dash-separated groups of 8 hex digits).
_ORTHANC_ID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")


def load_header_reader() -> Any:
    """`dicomflow.dicomheader` (standard library only) from the repository beside this script.

    None when it is not there (a plugin copied on its own): headers then come from
    Orthanc's JSON, which costs ~10 % of small-instance ingest.
    """
    root = os.path.dirname(_HERE)
    if not os.path.isfile(os.path.join(root, "dicomflow", "dicomheader.py")):
        return None
    if root not in sys.path:
        sys.path.append(root)
    try:
        from dicomflow import dicomheader
    except ImportError:
        return None
    return dicomheader



class Relay:
    """The queue, the sender thread, the spool and the counters; Orthanc's callbacks call into it."""

    def __init__(self, settings: PluginSettings):
        self.settings = settings
        self.spool = Spool(settings.spool_path)
        # Sequence numbers order the spool; one is given to an item as it enters the queue,
        # under a lock, so the queue is always in sequence order (see _low_water).
        self._next_seq = self.spool.last_seq() + 1
        self._seq_lock = threading.Lock()
        #: The first sequence number of the items the sender has taken and not yet delivered or spooled.
        self._inflight: int | None = None
        #: The first sequence number of items a sender error may have dropped (the checkpoint stays below).
        self._lost_from: int | None = None
        #: Orthanc's change sequence number up to which every instance was handed over (see _catch_up).
        self._checkpoint: int | None = None
        #: The last change the change reader has handled (stable series/studies queued up to it).
        self._cursor: int | None = None
        self._next_poll = 0.0
        #: Whether this start's catch-up succeeded; until then the checkpoint does not move.
        self._caught_up = False
        #: Orthanc's last change when the catch-up began, and when it may read back before it.
        self._catch_up_last: int | None = None
        self._catch_up_due = 0.0
        self._pending_checkpoint: tuple[int, float, int | None] | None = None
        #: With stable events from Lua: the change up to which every stable series/study was
        #: handed over (it follows the checkpoint StableGrace behind), and its pending move.
        self._stable_checkpoint: int | None = None
        self._pending_stable: tuple[int, float, int | None] | None = None
        self._last_checkpoint_at = 0.0
        #: Instance ids the callback saw until the catch-up succeeded (they need no replay); None after.
        self._seen: set[str] | None = set()
        # A deque, not queue.Queue: append/popleft are atomic and wake nobody, so the
        # callback never hands the GIL to the sender per event; the sender polls every
        # MaxBatchDelay and is woken early only when a full batch waits.
        self._queue: collections.deque = collections.deque()
        self._batch_ready = threading.Event()
        self._stop = threading.Event()
        self._delivery = Delivery(settings.scheduler_url, settings.token, settings.events_path,
                                  settings.connect_timeout, settings.request_timeout)
        self._json_format = orthanc.DicomToJsonFormat.HUMAN
        self._json_flags = orthanc.DicomToJsonFlags.NONE
        self._events = self._event_builder(settings)
        self._reader = None if self._events is None else self._events.reader
        #: The child process that builds events (started by the sender thread), None: built here.
        self._builder: BuilderProcess | None = None
        self._builder_state = "thread"
        self._builder_retry_at = 0.0
        self.counters = {
            "received": 0, "delivered": 0, "spooled": 0, "rejected": 0, "failed": 0,
            "overflow": 0, "batches": 0, "callbackErrors": 0, "unresolved": 0, "idLookups": 0, "replayed": 0,
            "builtInPlugin": 0, "builderFailures": 0, "stableFromLua": 0, "changesRead": 0,
        }
        self._counters_lock = threading.Lock()
        self.last_error: str | None = None
        self.last_delivery: float | None = None
        #: CPU seconds the sender thread has used (its share of Orthanc's CPU), as of its last step.
        self._sender_cpu = 0.0
        self._thread = threading.Thread(target=self._run, name="dicomflow-sender", daemon=True)

    def _event_builder(self, settings: PluginSettings) -> EventBuilder | None:
        """The reader of headers from the file's bytes when it can serve every configured tag, else None."""
        if settings.header_reader != _RAW:
            return None
        reader = load_header_reader()
        if reader is None:
            orthanc.LogWarning("dicomflow: dicomflow/dicomheader.py not found beside the plugin; "
                               "reading headers from Orthanc's JSON")
            return None
        unknown = EventBuilder.unknown_tags(reader, settings.tags)
        if unknown:
            orthanc.LogWarning(f"dicomflow: tags {unknown} are not in the raw reader's table; "
                               "reading headers from Orthanc's JSON")
            return None
        return EventBuilder(reader, settings.tags, settings.max_string_length)

    # ---- Orthanc callbacks (Orthanc's threads) -------------------------------------------

    def on_stored(self, dicom: Any, instance_id: str) -> None:
        """Capture the instance's headers and context, queue them; nothing slow happens here."""
        try:
            if self._reader is not None:
                # A copy of the bytes: ~free. The transfer syntax is read from them later (asking
                # Orthanc for it took ~6 µs here); the rare syntax the reader leaves to Orthanc
                # (big endian, deflated) is then read from Orthanc's REST API.
                headers, syntax = (_RAW, dicom.GetInstanceData()), None
            else:
                syntax = dicom.GetInstanceTransferSyntaxUid()
                headers = (_JSON, dicom.GetInstanceAdvancedJson(self._json_format, self._json_flags,
                                                                self.settings.max_string_length))
            metadata = dicom.GetInstanceMetadata  # None where absent (an upload has no called AE)
            item = (
                _KIND_INSTANCE, instance_id, headers,
                dicom.GetInstanceRemoteAet(), metadata("RemoteIP"), metadata("CalledAET"),
                syntax,
                time.time(),
            )
            self._bump("received")
            seen = self._seen
            if seen is not None:
                seen.add(instance_id)
            self._offer(item)
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing may raise into Orthanc's ingest path
            self._bump("callbackErrors")
            self._mark_lost(None)  # the checkpoint stays here: the next start reads it back from Orthanc
            self.last_error = f"on-stored {instance_id}: {type(exc).__name__}: {exc}"
            orthanc.LogError(f"dicomflow: {self.last_error}")

    def on_stable(self, level: str, resource_id: str) -> bool:
        """Queue the event of a series/study Orthanc declared stable (the Lua script's call).

        False (nothing queued) when `level` or `resource_id` is not one Orthanc would send.
        """
        if level not in ("series", "study") or not _ORTHANC_ID.fullmatch(resource_id):
            return False
        self._offer((level, resource_id, None, None, None, None, None, time.time()))
        self._bump("stableFromLua")
        return True

    def _bump(self, name: str, amount: int = 1) -> None:
        with self._counters_lock:  # Orthanc runs one callback thread per association
            self.counters[name] += amount

    def _offer(self, rest: tuple) -> None:
        """Number an item and queue it (or spool it when the queue is full)."""
        with self._seq_lock:
            item = (self._next_seq, *rest)
            self._next_seq += 1
            length = len(self._queue)
            if length < self.settings.queue_size:
                self._queue.append(item)
                if length + 1 == self.settings.batch_size:
                    self._batch_ready.set()
                return
            # Never dropped: the overflow goes to disk, ordered by its sequence number (under
            # the lock, so that _low_water never sees it neither queued nor spooled; rare).
            self._bump("overflow")
            try:
                self._spool_items([item])
            except BaseException:
                self._lower_lost_from(item[0])
                raise

    def _new_seq(self) -> int:
        with self._seq_lock:
            self._next_seq += 1
            return self._next_seq - 1

    def _mark_lost(self, seq: int | None) -> None:
        """Items from `seq` on (None: the next one) may be gone from memory: the checkpoint stays below."""
        with self._seq_lock:
            self._lower_lost_from(seq)

    def _lower_lost_from(self, seq: int | None) -> None:
        """`_mark_lost` for a caller that holds `_seq_lock`."""
        seq = self._next_seq if seq is None else seq
        self._lost_from = seq if self._lost_from is None else min(self._lost_from, seq)

    def start(self) -> None:
        """Start the sender thread (it waits for Orthanc to finish starting)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the sender; events still in memory are spooled for the next start."""
        self._stop.set()
        self._batch_ready.set()
        if self._thread.is_alive():
            self._thread.join(self.settings.request_timeout + 5)
        else:
            self._drain_queue_to_spool()
        if self._builder is not None:
            self._builder.close()
        self._delivery.close()
        self.spool.close()

    def status(self) -> dict[str, Any]:
        """Counters for the status route."""
        return {
            **self.counters,
            "queueLength": len(self._queue),
            "spoolLength": self.spool.length,
            "deadLetters": self.spool.dead_length,
            "lastError": self.last_error,
            "lastDelivery": self.last_delivery,
            "sender": "running" if self._thread.is_alive() else "stopped",
            "schedulerUrl": self.settings.scheduler_url,
            "headerReader": _RAW if self._reader is not None else _JSON,
            "builder": self._builder_state,
            "builderPid": None if self._builder is None else self._builder.pid,
            "checkpoint": self._checkpoint,
            "stableEvents": self.settings.stable_events,
            "stableCheckpoint": self._stable_checkpoint,
            "caughtUp": self._caught_up,
            "gilSwitchInterval": sys.getswitchinterval(),
            "senderCpuSeconds": round(self._sender_cpu, 4),
        }

    # ---- building events (sender thread) ------------------------------------------------

    def _finish(self, item: tuple) -> dict[str, Any] | None:
        """The event for a queued item (parse headers, Orthanc ids, REST for series/study)."""
        _seq, kind, resource_id, raw, aet, ip, called, syntax, received = item
        if kind == _KIND_REPLAY:
            return self._replayed_event(resource_id, received)
        if kind != _KIND_INSTANCE:
            return self._resource_event(kind, resource_id, received)
        how, captured = raw
        if how == _RAW:
            syntax, dataset = self._read_raw(resource_id, captured)
        else:
            dataset = json.loads(captured)
        return instance_event(select_headers(self.settings.tags, dataset), self._instance_ids(resource_id, dataset),
                              aet, ip, called, syntax, received)

    def _replayed_event(self, instance_id: str, received: float) -> dict[str, Any] | None:
        """The event of an instance stored before a crash, read back from Orthanc (`"replay": true`)."""
        try:
            metadata = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}/metadata?expand"))
            if self._reader is not None:
                _syntax, dataset = self._read_raw(instance_id, orthanc.GetDicomForInstance(instance_id))
            else:
                dataset = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}/simplified-tags"))
        except orthanc.OrthancException as exc:  # deleted since: nothing to process, but say so
            self._bump("unresolved")
            self.last_error = f"instance {instance_id} could not be replayed: {exc}"
            return None
        event = instance_event(select_headers(self.settings.tags, dataset), self._instance_ids(instance_id, dataset),
                               metadata.get("RemoteAET"), metadata.get("RemoteIP"), metadata.get("CalledAET"),
                               metadata.get("TransferSyntax"), received)
        event["replay"] = True
        return event

    def _read_raw(self, instance_id: str, data: bytes) -> tuple[str | None, dict[str, Any]]:
        """The transfer syntax and the configured tags from the file's bytes, trimmed as
        Orthanc's JSON has them.

        A transfer syntax or character set the reader leaves to Orthanc (or a file it cannot
        parse, which Orthanc could) is read from Orthanc's REST API instead (rare).
        """
        try:
            return self._events.read(data)
        except self._reader.HeaderError:
            self._bump("idLookups")
            tags = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}/simplified-tags"))
            try:
                syntax = orthanc.RestApiGet(f"/instances/{instance_id}/metadata/TransferSyntax").decode()
            except orthanc.OrthancException:
                syntax = None
            return syntax, tags

    def _instance_ids(self, instance_id: str, dataset: dict[str, Any]) -> dict[str, str]:
        """Orthanc's ids of the instance's parents, computed as Orthanc does; REST when that fails."""
        ids = computed_ids(instance_id, dataset)
        if ids is not None:
            return ids
        # The hash differs (a character-set conversion we did not reproduce): ask Orthanc.
        self._bump("idLookups")
        try:
            series = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}"))["ParentSeries"]
            study = json.loads(orthanc.RestApiGet(f"/series/{series}"))["ParentStudy"]
            patient = json.loads(orthanc.RestApiGet(f"/studies/{study}"))["ParentPatient"]
        except orthanc.OrthancException as exc:  # deleted meanwhile: send what is known
            self._bump("unresolved")
            self.last_error = f"instance {instance_id}: parents unknown: {exc}"
            return {"instance": instance_id}
        return {"instance": instance_id, "series": series, "study": study, "patient": patient}

    def _resource_event(self, level: str, resource_id: str, received: float) -> dict[str, Any] | None:
        """A series/study event with its main tags and every instance id, from Orthanc's REST API."""
        try:
            if level == "series":
                series = json.loads(orthanc.RestApiGet(f"/series/{resource_id}"))
                study = json.loads(orthanc.RestApiGet(f"/studies/{series['ParentStudy']}"))
                headers = {**study.get("PatientMainDicomTags", {}), **study["MainDicomTags"],
                           **series["MainDicomTags"]}
                ids = {"series": resource_id, "study": series["ParentStudy"],
                       "patient": study["ParentPatient"], "instances": list(series["Instances"])}
            else:
                study = json.loads(orthanc.RestApiGet(f"/studies/{resource_id}"))
                instances: list[str] = []
                for series_id in study["Series"]:
                    instances += json.loads(orthanc.RestApiGet(f"/series/{series_id}"))["Instances"]
                headers = {**study.get("PatientMainDicomTags", {}), **study["MainDicomTags"]}
                ids = {"study": resource_id, "patient": study["ParentPatient"],
                       "seriesIds": list(study["Series"]), "instances": instances}
        except (orthanc.OrthancException, KeyError, ValueError) as exc:
            if self._stop.is_set():
                # Orthanc is stopping (its API is closed): the next start re-reads this change
                # from the change log, which the checkpoint has not passed.
                orthanc.LogWarning(f"dicomflow: {level} {resource_id} left to the next start's catch-up")
                return None
            # Deleted before it could be sent: nothing to process, but say so.
            self._bump("unresolved")
            self.last_error = f"{level} {resource_id} could not be resolved: {exc}"
            orthanc.LogWarning(f"dicomflow: {self.last_error}")
            return None
        return {"level": level, "headers": headers, "orthanc": ids, "receivedAt": received}

    def _rows(self, items: list[tuple], keep: bool = False) -> list[tuple[int, str | bool]]:
        """(seq, event JSON) for each item; an item that cannot be made an event becomes a dead letter.

        With `keep` (the builder process delivers), True instead of the JSON of each event
        the builder process built: it keeps them for `_send_by_builder`.
        """
        rows, broken = [], []
        built = self._build_outside(items, keep)
        for item in items:
            text = built.get(item[0])
            if text is not None:
                rows.append((item[0], text))
                continue
            self._bump("builtInPlugin")
            try:
                event = self._finish(item)
            except Exception as exc:  # noqa: BLE001 - one bad instance must not take its batch (or the sender) along
                shown = [f"<{len(v[1])} bytes of DICOM>" if isinstance(v, tuple) and isinstance(v[1], bytes) else v
                         for v in item]
                broken.append((item[0], json.dumps({"unprocessed": shown}), f"{type(exc).__name__}: {exc}"))
                continue
            if event is not None:
                rows.append((item[0], to_json(event)))
        for seq, text, reason in broken:
            self._bump("rejected")
            self.last_error = f"event {seq} could not be built: {reason}"
            self.spool.bury([(seq, text)], 0, reason)
        return rows

    def _build_outside(self, items: list[tuple], keep: bool = False) -> dict[int, str | bool | None]:
        """Events of the captured instances among `items`, built by the builder process.

        {seq: event JSON (True with `keep`: the process keeps it to deliver it), or None
        where the plugin must build it itself}; {} when there is no
        builder process (it could not start, or failed and waits to be restarted), or when
        called outside the sender thread (an overflowing callback: the process serves one
        request at a time, the sender's).
        """
        if threading.current_thread() is not self._thread:
            return {}
        captured = [(item[0], item[2], item[3][1], item[4:])
                    for item in items if item[1] == _KIND_INSTANCE and item[3][0] == _RAW]
        if not captured or not self._builder_ready():
            return {}
        try:
            return self._builder.build_events(captured, keep)
        except BuilderError as exc:
            self._builder = None  # build() stopped it
            self._builder_failed(exc)
            return {}

    def _builder_ready(self) -> bool:
        """Whether a builder process runs (started, or restarted after a failure, when due)."""
        if self._builder is not None:
            return True
        if not self.settings.builder_process or time.monotonic() < self._builder_retry_at:
            return False
        settings = self.settings
        python = shutil.which(settings.builder_python) or settings.builder_python
        delivery = {"url": settings.scheduler_url, "token": settings.token, "eventsPath": settings.events_path,
                    "connectTimeout": settings.connect_timeout, "requestTimeout": settings.request_timeout}
        builder = BuilderProcess(python, os.path.dirname(_HERE), settings.tags, settings.max_string_length,
                                 delivery=delivery if settings.builder_delivers else None,
                                 nice=settings.builder_nice)
        try:
            builder.start()
        except BuilderError as exc:
            builder.close()
            self._builder_failed(exc)
            return False
        self._builder = builder
        self._builder_state = "process"
        return True

    def _builder_failed(self, exc: BuilderError) -> None:
        """Say so, build events here meanwhile, and start a new builder process RetryMaxDelay later."""
        self._builder_state = f"failed: {exc}"
        self._builder_retry_at = time.monotonic() + self.settings.retry_max_delay
        self._bump("builderFailures")
        self.last_error = f"builder process: {exc}"
        orthanc.LogError(f"dicomflow: {self.last_error}; building events in Orthanc meanwhile")

    def _spool_items(self, items: list[tuple]) -> None:
        rows = self._rows(items)
        self.spool.append(rows)
        self._bump("spooled", len(rows))

    # ---- the sender thread --------------------------------------------------------------

    def _run(self) -> None:
        delay = self.settings.retry_min_delay
        next_catch_up = 0.0
        self._wait_for_orthanc()
        while not self._stop.is_set():
            if not self._caught_up and time.monotonic() >= next_catch_up:
                try:
                    if self._catch_up_last is None:
                        self._begin_catch_up()
                    elif time.monotonic() >= self._catch_up_due:
                        self._catch_up()
                except Exception as exc:  # noqa: BLE001 - retried; until then the checkpoint does not move
                    self._catch_up_last = None
                    next_catch_up = time.monotonic() + self.settings.retry_max_delay
                    self.last_error = f"catch-up: {type(exc).__name__}: {exc}"
                    orthanc.LogError(f"dicomflow: {self.last_error}")
            if self._caught_up and self.settings.stable_events == _CHANGES and time.monotonic() >= self._next_poll:
                self._next_poll = time.monotonic() + self.settings.change_poll_interval
                try:
                    self._read_changes()
                except Exception as exc:  # noqa: BLE001 - read again from the same change next time
                    self.last_error = f"change log: {type(exc).__name__}: {exc}"
                    orthanc.LogError(f"dicomflow: {self.last_error}")
            try:
                ok = self._step()
            except Exception as exc:  # noqa: BLE001 - the thread's boundary: log, back off, keep sending
                ok = False
                if self._inflight is not None:
                    # What it held may be gone: the checkpoint stays below it until a restart
                    # reads those instances back from Orthanc.
                    self._mark_lost(self._inflight)
                self.last_error = f"sender: {type(exc).__name__}: {exc}"
                orthanc.LogError(f"dicomflow: {self.last_error}")
            self._inflight = None
            if ok:
                delay = self.settings.retry_min_delay
            else:
                self._drain_queue_to_spool()
                self._back_off(delay)
                delay = min(delay * 2, self.settings.retry_max_delay)
            if self._caught_up:
                try:
                    self._advance_checkpoint(time.monotonic())
                except Exception as exc:  # noqa: BLE001 - only the checkpoint lags; delivery goes on
                    self.last_error = f"checkpoint: {type(exc).__name__}: {exc}"
            self._sender_cpu = time.thread_time()
        self._drain_queue_to_spool()

    def _wait_for_orthanc(self) -> None:
        """The sender starts with the plugin, before Orthanc's database is open: wait until it is."""
        while not self._stop.is_set():
            try:
                self._last_change()  # the database: /system answers before it is open
                return
            except orthanc.OrthancException as exc:
                if not exc.args or exc.args[0] != _NOT_YET:
                    return  # another error: the catch-up reports it, and is retried
            self._stop.wait(0.01)  # briefly: see _first_checkpoint

    def _back_off(self, delay: float) -> None:
        """Wait `delay` s before the next attempt, spooling what arrives meanwhile (a crash then loses nothing)."""
        end = time.monotonic() + delay
        while not self._stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self._stop.wait(min(left, self.settings.max_batch_delay))
            self._drain_queue_to_spool()

    # ---- catching up with Orthanc's change log after a crash ------------------------------
    #
    # What the sender has taken from memory but not yet delivered or spooled, and what is
    # still queued, dies with the process on a SIGKILL or a crash. Orthanc's own change log
    # (`/changes`, in its database) does not: the plugin keeps a checkpoint, a change
    # sequence number up to which every stored instance was handed over, and at start
    # re-reads the instances stored after it from Orthanc (`"replay": true`: the scheduler
    # skips the ones it already scheduled).

    def _last_change(self) -> int:
        return int(json.loads(orthanc.RestApiGet("/changes?last"))["Last"])

    def _begin_catch_up(self) -> None:
        """At start: note Orthanc's last change; `_catch_up` reads back what came before it,
        START_GRACE later (the sender delivers meanwhile)."""
        self._catch_up_last = self._last_change()
        self._catch_up_due = time.monotonic() + START_GRACE
        if self.spool.get_state("checkpoint") is None:
            # The first start with this spool: what Orthanc logged before is not this plugin's
            # to replay, and what comes next is read back after a crash, even a crash before
            # the catch-up is done.
            self._save_checkpoint(self._first_checkpoint(self._catch_up_last))
            self._save_stable_checkpoint(self._checkpoint)

    def _first_checkpoint(self, last: int) -> int:
        """`last`, or just below the first instance this run's callback saw before it.

        Instances may be stored between the opening of Orthanc's database and the sender's
        first read of its change log; their events are still in memory, so the first
        checkpoint must not pass them (a crash would lose them). They were stored moments
        ago: their changes are among the last few.
        """
        seen = set(self._seen or ())  # after reading `last`: every callback of a change up to it that ran
        if not seen:
            return last
        first = None
        for changes in self._change_pages(max(0, last - 10 * len(seen) - 100), last):
            for change in changes:
                if change["ChangeType"] == "NewInstance" and change["ID"] in seen:
                    first = change["Seq"] if first is None else min(first, change["Seq"])
        return last if first is None else first - 1

    def _catch_up(self) -> None:
        """Events for the instances (and stable series/studies) logged after the checkpoint.

        Raises whatever Orthanc's API or the spool raise; the checkpoint is then unchanged
        and `_run` starts over later.
        """
        last = self._catch_up_last
        stored = self.spool.get_state("checkpoint")
        stable = self.spool.get_state("stableCheckpoint")  # absent in a spool from before session 8
        self._stable_checkpoint = None if stable is None else int(stable)
        # Changes up to `last` logged by this process have had their on-stored callbacks run
        # within the grace time: their instances are in `_seen` (no replay needed), numbered
        # below the marker taken here, so the checkpoint passes `last` once they are delivered.
        if stored is not None and int(stored) > last:
            orthanc.LogWarning(f"dicomflow: Orthanc's change log ends at {last}, before the checkpoint "
                               f"{stored} (a new database?): nothing to catch up")
        replayed = 0
        if stored is not None and int(stored) <= last:
            since_stable = int(stored) if stable is None else min(int(stable), int(stored))
            replayed = self._replay(int(stored), since_stable, last, self._seen | self.spool.instance_ids())
        if self._stop.is_set():
            return  # stopped half-way: the next start catches up again from the same checkpoint
        self._bump("replayed", replayed)
        if replayed:
            orthanc.LogWarning(f"dicomflow: {replayed} instances stored after change {stored} were never "
                               "handed over (Orthanc stopped abruptly?): read back from Orthanc and spooled")
        with self._seq_lock:
            self._pending_checkpoint = (last, time.monotonic(), self._next_seq)
        if self.settings.stable_events == _LUA:
            # The Lua engine may still be working through changes up to `last`: its marker
            # is taken StableGrace from now.
            self._pending_stable = (last, time.monotonic(), None)
        self._cursor = last
        self._caught_up = True
        self._seen = None

    def _change_pages(self, since: int, last: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """Orthanc's changes after `since` (up to `last`), oldest first, a page at a time."""
        while not self._stop.is_set():
            page = json.loads(orthanc.RestApiGet(f"/changes?since={since}&limit={_CHANGES_PAGE}"))
            changes = [c for c in page["Changes"] if last is None or c["Seq"] <= last]
            self._bump("changesRead", len(changes))
            if changes:
                yield changes
            if page["Done"] or len(changes) < len(page["Changes"]) or not changes:
                return
            since = changes[-1]["Seq"]

    def _replay(self, since: int, since_stable: int, last: int, skip: set[str]) -> int:
        """Spool events for the instances logged in (since, last] but those in `skip`, and
        for the stable series/studies logged in (since_stable, last]."""
        replayed = 0
        replayed_changes = _REPLAYED_CHANGES
        if self.settings.stable_events == _OFF:
            replayed_changes = {"NewInstance": _KIND_REPLAY}
            since_stable = since
        for changes in self._change_pages(min(since, since_stable), last):
            items = [(self._new_seq(), replayed_changes[c["ChangeType"]], c["ID"], None, None, None, None, None,
                      time.time()) for c in changes
                     if c["ChangeType"] in replayed_changes and c["ID"] not in skip
                     and c["Seq"] > (since if c["ChangeType"] == "NewInstance" else since_stable)]
            self._spool_items(items)
            replayed += sum(1 for item in items if item[1] == _KIND_REPLAY)
        return replayed

    def _read_changes(self) -> None:
        """Queue an event for each stable series/study Orthanc logged since the last read.

        The plugin registers no on-change callback: with one, Orthanc's change thread enters
        the interpreter at each new instance just as the ingest thread enters the on-stored
        callback, and the two wait for each other's GIL (~6 % of small-instance ingest).
        """
        for changes in self._change_pages(self._cursor):
            for change in changes:
                kind = _STABLE_CHANGES.get(change["ChangeType"])
                if kind is not None:
                    self._offer((kind, change["ID"], None, None, None, None, None, time.time()))
            self._cursor = changes[-1]["Seq"]

    def _save_checkpoint(self, change: int) -> None:
        if change != self._checkpoint:
            self.spool.set_state("checkpoint", str(change))
            self._checkpoint = change
        if self.settings.stable_events == _CHANGES:
            # The change reader had queued every stable series/study up to it: both move together.
            self._save_stable_checkpoint(change)

    def _save_stable_checkpoint(self, change: int | None) -> None:
        if change is not None and change != self._stable_checkpoint:
            self.spool.set_state("stableCheckpoint", str(change))
            self._stable_checkpoint = change

    def _first_queued(self) -> int:
        """The sequence number of the oldest queued item (the next one when the queue is empty).

        Under the lock an overflowing callback spools with (see _offer): every item numbered
        below it is then delivered, spooled, or held by the sender.
        """
        with self._seq_lock:
            try:
                return self._queue[0][0]  # the queue is in sequence order
            except IndexError:
                return self._next_seq

    def _low_water(self) -> int:
        """The lowest sequence number not yet delivered or spooled, between two sends."""
        first = self._first_queued()
        lost = self._lost_from
        return first if lost is None else min(first, lost)

    def _advance_checkpoint(self, now: float) -> None:
        """Every CheckpointInterval: note Orthanc's last change; once the events of every
        instance logged up to it are delivered or spooled, make it the checkpoint.

        With stable series/studies from the Lua script, the stable checkpoint follows the
        same way with StableGrace for the callbacks' time (one move at a time).
        """
        lua = self.settings.stable_events == _LUA
        if self._pending_checkpoint is None:
            if now - self._last_checkpoint_at >= self.settings.checkpoint_interval:
                # Lua: Orthanc's last change. Change log: the reader's cursor (every stable
                # series/study up to it is queued already).
                change = self._cursor if self.settings.stable_events == _CHANGES else self._last_change()
                self._pending_checkpoint = (change, now, None)
                if lua and self._pending_stable is None:
                    self._pending_stable = (change, now, None)
        else:
            self._pending_checkpoint, reached = self._moved(self._pending_checkpoint, now,
                                                            self.settings.callback_grace)
            if reached is not None:
                self._save_checkpoint(reached)
                self._last_checkpoint_at = now
        if lua and self._pending_stable is not None:
            self._pending_stable, reached = self._moved(self._pending_stable, now, self.settings.stable_grace)
            self._save_stable_checkpoint(reached)

    def _moved(self, pending: tuple[int, float, int | None], now: float,
               grace: float) -> tuple[tuple[int, float, int | None] | None, int | None]:
        """One step of a checkpoint's move: (what is still pending, the change reached or None)."""
        change, noted, marker = pending
        if marker is None:
            # `grace` after noting `change`, the callbacks of changes up to it have all queued
            # their items by now: every one of them is numbered below the marker taken here.
            if now - noted >= grace:
                with self._seq_lock:
                    return (change, noted, self._next_seq), None
            return pending, None
        if self._low_water() >= marker:
            return None, change
        return pending, None

    def _take(self, limit: int) -> list[tuple]:
        """Pop up to `limit` queued items, oldest first."""
        items = []
        pop = self._queue.popleft
        try:
            while len(items) < limit:
                items.append(pop())
        except IndexError:
            pass
        if items and self._inflight is None:
            self._inflight = items[0][0]
        return items

    def _drain_queue_to_spool(self) -> None:
        items = self._take(len(self._queue))
        if items:
            try:
                self._spool_items(items)
            except sqlite3.Error as exc:  # disk full, spool unwritable: put them back, say so
                self._queue.extendleft(reversed(items))
                self.last_error = f"spool: {type(exc).__name__}: {exc}"
                orthanc.LogError(f"dicomflow: cannot write the spool, {len(items)} events stay in memory: {exc}")
            finally:
                self._inflight = None  # spooled, or back in the queue

    def _step(self) -> bool:
        """Send one batch: from the spool while it holds anything, else from the queue."""
        if not self.spool.length:
            items = self._collect()
            if not self.spool.length:
                return self._send_items(items)
            # Spooled meanwhile (re-queued dead letters, overflow): older events go first.
            self._spool_items(items)
        if self.spool.length:
            self._drain_queue_to_spool()  # newer events go behind the spooled ones
            # While the drain wrote to disk, the callback may have queued new items and then,
            # the queue full again, spooled the ones after them: those wait for the queued ones.
            rows = self.spool.head(self.settings.batch_size, self._first_queued())
            if not rows:
                return True  # the next step spools the queued items first
            outcome = self._send(rows)
            if outcome == "delivered":
                self.spool.remove([seq for seq, _ in rows])
            return outcome != "failed"
        return True

    def _send_items(self, items: list[tuple]) -> bool:
        """Send queued items as one batch; spool them when the scheduler cannot take them.

        The builder process, when there is one, builds and POSTs the batch itself: the
        events then never come back through Orthanc's interpreter unless the batch must be
        spooled or kept as dead letters.
        """
        if not items:
            return True
        rows = self._rows(items, keep=self.settings.builder_delivers)
        if not rows:
            return True
        if any(text is True for _, text in rows):
            outcome, rows = self._send_by_builder(items, rows)
        else:
            outcome = self._send(rows)
        if outcome == "failed":
            self.spool.append(rows)
            self._bump("spooled", len(rows))
            return False
        return True

    def _collect(self) -> list[tuple]:
        """Up to BatchSize queued items, once a batch is full or MaxBatchDelay has passed."""
        if len(self._queue) < self.settings.batch_size:
            self._batch_ready.wait(self.settings.max_batch_delay)
        self._batch_ready.clear()
        return self._take(self.settings.batch_size)

    def _send_by_builder(self, items: list[tuple], rows: list[tuple[int, str | bool]]) -> tuple[str, list]:
        """Have the builder process POST the batch (its kept events and `rows`' JSON, in order).

        Returns the outcome (as `_send`) and the batch's (seq, JSON) rows when it was not
        taken (to spool), else `rows`.
        """
        self._bump("batches")
        try:
            status, reason, back = self._builder.deliver([seq if text is True else (seq, text) for seq, text in rows])
        except BuilderError as exc:
            self._builder = None  # deliver() stopped it
            self._builder_failed(exc)
            # Whether the scheduler took the batch is unknown: build the kept events here and
            # send the batch again (the scheduler plans an event it already has only once).
            kept = {seq for seq, text in rows if text is True}
            again = dict(self._rows([item for item in items if item[0] in kept]))
            rows = [(seq, again[seq] if text is True else text) for seq, text in rows
                    if text is not True or seq in again]
            return self._send(rows), rows
        if status is None:
            self._bump("failed", len(back))
            self.last_error = f"delivery: {reason}"
            return "failed", back
        return self._answered(back if back is not None else rows, status, reason), back or rows

    def _send(self, rows: list[tuple[int, str]]) -> str:
        """POST the rows as one batch: 'delivered', 'rejected' (now dead letters) or 'failed'."""
        body = batch_body([text for _, text in rows])
        self._bump("batches")
        try:
            status, answer = self._delivery.post(body)
        except DeliveryError as exc:
            self._bump("failed", len(rows))
            self.last_error = f"delivery: {exc}"
            return "failed"
        return self._answered(rows, status, answer[:500].decode("utf-8", "replace"))

    def _answered(self, rows: list[tuple[int, Any]], status: int, reason: str) -> str:
        """Count the scheduler's answer to a batch of `rows` (their JSON unless taken); bury refused ones."""
        if 200 <= status < 300:
            self._bump("delivered", len(rows))
            self.last_delivery = time.time()
            return "delivered"
        self.last_error = f"scheduler answered {status}: {reason}"
        if status in REJECTED:
            self._bump("rejected", len(rows))
            self.spool.bury(rows, status, reason)
            orthanc.LogWarning(f"dicomflow: {len(rows)} events refused ({status}), kept as dead letters")
            return "rejected"
        self._bump("failed", len(rows))
        return "failed"


def _answer(output: Any, payload: Any) -> None:
    output.AnswerBuffer(json.dumps(payload, indent=1), "application/json")


def install() -> Relay | None:
    """Read the settings, open the spool and register the callbacks with Orthanc."""
    try:
        settings = PluginSettings.from_configuration(json.loads(orthanc.GetConfiguration()))
    except (ValueError, TypeError, OSError) as exc:
        orthanc.LogError(f"dicomflow: plugin disabled, bad configuration: {exc}")
        return None
    if settings.gil_switch_interval is not None:
        sys.setswitchinterval(settings.gil_switch_interval)
    relay = Relay(settings)
    import dicomflow_disk  # beside this script: the disk guard and the retention policy

    # The queue's items are (seq, kind, Orthanc id, ...): retention keeps what they are about.
    guard, retention = dicomflow_disk.install(orthanc, settings, lambda: [item[2] for item in list(relay._queue)])

    def status_route(output: Any, uri: str, **request: Any) -> None:
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
        else:
            _answer(output, {**relay.status(), **dicomflow_disk.status(guard, retention)})

    def retry_route(output: Any, uri: str, **request: Any) -> None:
        if request["method"] != "POST":
            output.SendMethodNotAllowed("POST")
        else:
            _answer(output, {"requeued": relay.spool.resurrect()})

    def dead_route(output: Any, uri: str, **request: Any) -> None:
        if request["method"] != "GET":
            output.SendMethodNotAllowed("GET")
        else:
            limit = int((request.get("get") or {}).get("limit", 100))
            _answer(output, relay.spool.dead_letters(limit))

    def stable_route(output: Any, uri: str, **request: Any) -> None:
        # Called by dicomflow_stable.lua (Orthanc's Lua engine), once per stable series/study.
        if request["method"] != "POST":
            output.SendMethodNotAllowed("POST")
            return
        resource_id = (request.get("body") or b"").decode("ascii", "replace").strip()
        if relay.on_stable(request["groups"][0], resource_id):
            _answer(output, {"queued": request["groups"][0], "id": resource_id})
        else:
            output.SendHttpStatusCode(400)

    orthanc.RegisterOnStoredInstanceCallback(relay.on_stored)
    orthanc.RegisterRestCallback("/dicomflow/stable/(series|study)", stable_route)
    orthanc.RegisterRestCallback("/dicomflow/status", status_route)
    orthanc.RegisterRestCallback("/dicomflow/spool/retry", retry_route)
    orthanc.RegisterRestCallback("/dicomflow/spool/dead", dead_route)
    # Orthanc Explorer: a button on each study and series page that opens that study on the
    # scheduler's status page (Dicomflow.StatusPageUrl; default: the scheduler's address).
    import urllib.parse

    status_page = str(json.loads(orthanc.GetConfiguration())["Dicomflow"].get("StatusPageUrl") or "")
    if not status_page:
        parts = urllib.parse.urlsplit(settings.scheduler_url)
        status_page = f"{parts.scheme}://{parts.netloc}/"
    orthanc.ExtendOrthancExplorer("""
(function () {
  var statusPage = STATUS_PAGE;
  function addLink(page, before, studyOf) {
    $(page).live('pagebeforecreate', function () {
      var link = $('<a>').attr('id', 'dicomflow-status-' + page.substring(1)).attr('data-role', 'button')
        .attr('href', '#').attr('data-icon', 'info').attr('data-theme', 'e')
        .text('dicomflow: what happened to this study');
      link.insertBefore($(before).parent().parent());
      link.click(function () {
        var uuid = $.mobile.pageData && $.mobile.pageData.uuid;
        if (uuid) {
          $.ajax({url: studyOf(uuid), dataType: 'json', cache: false, success: function (study) {
            window.location.href = statusPage + '?q=' + encodeURIComponent(study.MainDicomTags.StudyInstanceUID);
          }});
        }
        return false;
      });
    });
  }
  addLink('#study', '#study-delete', function (id) { return '../studies/' + id; });
  addLink('#series', '#series-delete', function (id) { return '../series/' + id + '/study'; });
})();
""".replace("STATUS_PAGE", json.dumps(status_page)))
    orthanc.LogWarning(
        f"dicomflow: delivering to {settings.scheduler_url}; spool {settings.spool_path} holds "
        f"{relay.spool.length} events, {relay.spool.dead_length} dead letters; stable series/studies: "
        f"{_STABLE_SOURCES[settings.stable_events]}"
    )
    relay.start()
    # Orthanc's plugin 4.0 finalises the interpreter when Orthanc stops: the queue goes to the spool then.
    atexit.register(relay.stop)
    for part in (guard, retention):  # run before relay.stop (atexit is last in, first out)
        if part is not None:
            atexit.register(part.stop)
    return relay


RELAY = install()
