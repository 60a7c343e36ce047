"""Turns the capture's queued items into events (JSON): in the builder process, or here with
Orthanc's API for what the file's bytes do not tell (series/study events, replayed instances,
a header or ids the reader leaves to Orthanc)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from typing import Any

import orthanc
from dicomflow_builder import BuilderError, BuilderProcess
from dicomflow_capture import KIND_INSTANCE, KIND_REPLAY
from dicomflow_counters import Counters
from dicomflow_events import EventBuilder, computed_ids, instance_event, select_headers, to_json
from dicomflow_settings import RAW, PluginSettings
from dicomflow_spool import Spool

_HERE = os.path.dirname(os.path.abspath(__file__))


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


def event_builder(settings: PluginSettings) -> EventBuilder | None:
    """The reader of headers from the file's bytes when it can serve every configured tag, else None."""
    if settings.header_reader != RAW:
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
    return EventBuilder(reader, settings.tags, settings.max_string_length, settings.server)


class EventMaker:
    """Builds the events of queued items; items that cannot be made events become dead letters."""

    def __init__(self, settings: PluginSettings, counters: Counters, spool: Spool, stopping: threading.Event):
        self.settings = settings
        self.counters = counters
        self.spool = spool
        self._stopping = stopping
        self._events = event_builder(settings)
        #: `dicomflow.dicomheader` when headers are read from the file's bytes, else None.
        self.reader = None if self._events is None else self._events.reader
        #: The one thread the builder process serves (the sender's), set when it is made.
        self.owner: threading.Thread | None = None
        #: The child process that builds events (started by the sender thread), None: built here.
        self.builder: BuilderProcess | None = None
        self.builder_state = "thread"
        self._builder_retry_at = 0.0

    def spool_items(self, items: list[tuple]) -> None:
        """Build the items' events and write them to the spool."""
        rows = self.rows(items)
        self.spool.append(rows)
        self.counters.bump("spooled", len(rows))

    def rows(self, items: list[tuple], keep: bool = False) -> list[tuple[int, str | bool]]:
        """(seq, event JSON) for each item; an item that cannot be made an event becomes a dead letter.

        With `keep` (the builder process delivers), True instead of the JSON of each event
        the builder process built: it keeps them for the sender's `send_by_builder`.
        """
        rows, broken = [], []
        built = self._build_outside(items, keep)
        for item in items:
            text = built.get(item[0])
            if text is not None:
                rows.append((item[0], text))
                continue
            self.counters.bump("builtInPlugin")
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
            self.counters.bump("rejected")
            self.counters.last_error = f"event {seq} could not be built: {reason}"
            self.spool.bury([(seq, text)], 0, reason)
        return rows

    # ---- in the builder process -----------------------------------------------------------

    def _build_outside(self, items: list[tuple], keep: bool = False) -> dict[int, str | bool | None]:
        """Events of the captured instances among `items`, built by the builder process.

        {seq: event JSON (True with `keep`: the process keeps it to deliver it), or None
        where the plugin must build it itself}; {} when there is no
        builder process (it could not start, or failed and waits to be restarted), or when
        called outside the sender thread (an overflowing callback: the process serves one
        request at a time, the sender's).
        """
        if threading.current_thread() is not self.owner:
            return {}
        captured = [(item[0], item[2], item[3][1], item[4:])
                    for item in items if item[1] == KIND_INSTANCE and item[3][0] == RAW]
        if not captured or not self._builder_ready():
            return {}
        try:
            return self.builder.build_events(captured, keep)
        except BuilderError as exc:
            self.builder = None  # build() stopped it
            self.builder_failed(exc)
            return {}

    def start_builder(self) -> None:
        """Start the builder process now, when events are read from the files' bytes (the
        sender thread calls it as it starts): started at the first batch, its start and
        imports (~140 ms) delayed the first study's events after each Orthanc start."""
        if self._events is not None and threading.current_thread() is self.owner:
            self._builder_ready()

    def _builder_ready(self) -> bool:
        """Whether a builder process runs (started, or restarted after a failure, when due)."""
        if self.builder is not None:
            return True
        if not self.settings.builder_process or time.monotonic() < self._builder_retry_at:
            return False
        settings = self.settings
        python = shutil.which(settings.builder_python) or settings.builder_python
        delivery = {"url": settings.scheduler_url, "token": settings.token, "eventsPath": settings.events_path,
                    "connectTimeout": settings.connect_timeout, "requestTimeout": settings.request_timeout}
        builder = BuilderProcess(python, os.path.dirname(_HERE), settings.tags, settings.max_string_length,
                                 delivery=delivery if settings.builder_delivers else None,
                                 nice=settings.builder_nice, server=settings.server)
        try:
            builder.start()
        except BuilderError as exc:
            builder.close()
            self.builder_failed(exc)
            return False
        self.builder = builder
        self.builder_state = "process"
        return True

    def builder_failed(self, exc: BuilderError) -> None:
        """Say so, build events here meanwhile, and start a new builder process RetryMaxDelay later."""
        self.builder_state = f"failed: {exc}"
        self._builder_retry_at = time.monotonic() + self.settings.retry_max_delay
        self.counters.bump("builderFailures")
        self.counters.last_error = f"builder process: {exc}"
        orthanc.LogError(f"dicomflow: {self.counters.last_error}; building events in Orthanc meanwhile")

    def close(self) -> None:
        if self.builder is not None:
            self.builder.close()

    # ---- here, in Orthanc's interpreter ---------------------------------------------------

    def _finish(self, item: tuple) -> dict[str, Any] | None:
        """The event for a queued item (parse headers, Orthanc ids, REST for series/study)."""
        _seq, kind, resource_id, raw, aet, ip, called, syntax, received = item
        if kind == KIND_REPLAY:
            return self._replayed_event(resource_id, received)
        if kind != KIND_INSTANCE:
            return self._resource_event(kind, resource_id, received)
        how, captured = raw
        if how == RAW:
            syntax, dataset = self._read_raw(resource_id, captured)
        else:
            dataset = json.loads(captured)
        return instance_event(select_headers(self.settings.tags, dataset), self._instance_ids(resource_id, dataset),
                              aet, ip, called, syntax, received, self.settings.server)

    def _replayed_event(self, instance_id: str, received: float) -> dict[str, Any] | None:
        """The event of an instance stored before a crash, read back from Orthanc (`"replay": true`)."""
        try:
            metadata = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}/metadata?expand"))
            if self.reader is not None:
                _syntax, dataset = self._read_raw(instance_id, orthanc.GetDicomForInstance(instance_id))
            else:
                dataset = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}/simplified-tags"))
        except orthanc.OrthancException as exc:  # deleted since: nothing to process, but say so
            self.counters.bump("unresolved")
            self.counters.last_error = f"instance {instance_id} could not be replayed: {exc}"
            return None
        event = instance_event(select_headers(self.settings.tags, dataset), self._instance_ids(instance_id, dataset),
                               metadata.get("RemoteAET"), metadata.get("RemoteIP"), metadata.get("CalledAET"),
                               metadata.get("TransferSyntax"), received, self.settings.server)
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
        except self.reader.HeaderError:
            self.counters.bump("idLookups")
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
        self.counters.bump("idLookups")
        try:
            series = json.loads(orthanc.RestApiGet(f"/instances/{instance_id}"))["ParentSeries"]
            study = json.loads(orthanc.RestApiGet(f"/series/{series}"))["ParentStudy"]
            patient = json.loads(orthanc.RestApiGet(f"/studies/{study}"))["ParentPatient"]
        except orthanc.OrthancException as exc:  # deleted meanwhile: send what is known
            self.counters.bump("unresolved")
            self.counters.last_error = f"instance {instance_id}: parents unknown: {exc}"
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
            if self._stopping.is_set():
                # Orthanc is stopping (its API is closed): the next start re-reads this change
                # from the change log, which the checkpoint has not passed.
                orthanc.LogWarning(f"dicomflow: {level} {resource_id} left to the next start's catch-up")
                return None
            # Deleted before it could be sent: nothing to process, but say so.
            self.counters.bump("unresolved")
            self.counters.last_error = f"{level} {resource_id} could not be resolved: {exc}"
            orthanc.LogWarning(f"dicomflow: {self.counters.last_error}")
            return None
        if self.settings.server:
            ids["server"] = self.settings.server
        return {"level": level, "headers": headers, "orthanc": ids, "receivedAt": received}
