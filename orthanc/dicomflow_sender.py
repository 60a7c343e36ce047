"""The sender thread: delivers the queued events to the scheduler in batches, the spool's first,
and keeps in the spool what the scheduler cannot take (backing off until it can)."""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import orthanc
from dicomflow_builder import BuilderError
from dicomflow_capture import Capture
from dicomflow_catchup import CatchUp
from dicomflow_counters import Counters
from dicomflow_delivery import Delivery, DeliveryError, batch_body
from dicomflow_eventmaker import EventMaker
from dicomflow_settings import PluginSettings
from dicomflow_spool import Spool

#: Answers that will not improve by sending the same batch again: dead letters.
REJECTED = frozenset({400, 401, 403, 404, 405, 413, 422})


class Sender:
    """One thread: the catch-up's steps, then batches from the spool or the queue, in reception order."""

    def __init__(self, settings: PluginSettings, counters: Counters, capture: Capture, maker: EventMaker,
                 catch_up: CatchUp, spool: Spool, stopping: threading.Event):
        self.settings = settings
        self.counters = counters
        self.capture = capture
        self.maker = maker
        self.catch_up = catch_up
        self.spool = spool
        self._stopping = stopping
        self._delivery = Delivery(settings.scheduler_url, settings.token, settings.events_path,
                                  settings.connect_timeout, settings.request_timeout)
        #: CPU seconds the sender thread has used (its share of Orthanc's CPU), as of its last step.
        self.cpu = 0.0
        self.thread = threading.Thread(target=self._run, name="dicomflow-sender", daemon=True)
        maker.owner = self.thread  # the builder process serves this thread only

    def start(self) -> None:
        """Start the sender thread (it waits for Orthanc to finish starting)."""
        self.thread.start()

    def stop(self) -> None:
        """Stop sending (`stopping` is set); events still in memory are spooled for the next start."""
        self.capture.batch_ready.set()
        if self.thread.is_alive():
            self.thread.join(self.settings.request_timeout + 5)
        else:
            self._drain_queue_to_spool()
        self.maker.close()
        self._delivery.close()

    def _run(self) -> None:
        delay = self.settings.retry_min_delay
        self.catch_up.wait_for_orthanc()
        self.maker.start_builder()
        while not self._stopping.is_set():
            self.catch_up.before_send()
            try:
                ok = self._step()
            except Exception as exc:  # noqa: BLE001 - the thread's boundary: log, back off, keep sending
                ok = False
                if self.capture.inflight is not None:
                    # What it held may be gone: the checkpoint stays below it until a restart
                    # reads those instances back from Orthanc.
                    self.capture.mark_lost(self.capture.inflight)
                self.counters.last_error = f"sender: {type(exc).__name__}: {exc}"
                orthanc.LogError(f"dicomflow: {self.counters.last_error}")
            self.capture.inflight = None
            if ok:
                delay = self.settings.retry_min_delay
            else:
                self._drain_queue_to_spool()
                self._back_off(delay)
                delay = min(delay * 2, self.settings.retry_max_delay)
            self.catch_up.advance()
            self.cpu = time.thread_time()
        self._drain_queue_to_spool()

    def _back_off(self, delay: float) -> None:
        """Wait `delay` s before the next attempt, spooling what arrives meanwhile (a crash then loses nothing)."""
        end = time.monotonic() + delay
        while not self._stopping.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            self._stopping.wait(min(left, self.settings.max_batch_delay))
            self._drain_queue_to_spool()

    def _drain_queue_to_spool(self) -> None:
        items = self.capture.take(len(self.capture.queue))
        if items:
            try:
                self.maker.spool_items(items)
            except sqlite3.Error as exc:  # disk full, spool unwritable: put them back, say so
                self.capture.queue.extendleft(reversed(items))
                self.counters.last_error = f"spool: {type(exc).__name__}: {exc}"
                orthanc.LogError(f"dicomflow: cannot write the spool, {len(items)} events stay in memory: {exc}")
            finally:
                self.capture.inflight = None  # spooled, or back in the queue

    def _step(self) -> bool:
        """Send one batch: from the spool while it holds anything, else from the queue."""
        if not self.spool.length:
            items = self.capture.collect()
            if not self.spool.length:
                return self._send_items(items)
            # Spooled meanwhile (re-queued dead letters, overflow): older events go first.
            self.maker.spool_items(items)
        if self.spool.length:
            self._drain_queue_to_spool()  # newer events go behind the spooled ones
            # While the drain wrote to disk, the callback may have queued new items and then,
            # the queue full again, spooled the ones after them: those wait for the queued ones.
            rows = self.spool.head(self.settings.batch_size, self.capture.first_queued())
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
        rows = self.maker.rows(items, keep=self.settings.builder_delivers)
        if not rows:
            return True
        if any(text is True for _, text in rows):
            outcome, rows = self._send_by_builder(items, rows)
        else:
            outcome = self._send(rows)
        if outcome == "failed":
            self.spool.append(rows)
            self.counters.bump("spooled", len(rows))
            return False
        return True

    def _send_by_builder(self, items: list[tuple], rows: list[tuple[int, str | bool]]) -> tuple[str, list]:
        """Have the builder process POST the batch (its kept events and `rows`' JSON, in order).

        Returns the outcome (as `_send`) and the batch's (seq, JSON) rows when it was not
        taken (to spool), else `rows`.
        """
        self.counters.bump("batches")
        try:
            status, reason, back = self.maker.builder.deliver(
                [seq if text is True else (seq, text) for seq, text in rows])
        except BuilderError as exc:
            self.maker.builder = None  # deliver() stopped it
            self.maker.builder_failed(exc)
            # Whether the scheduler took the batch is unknown: build the kept events here and
            # send the batch again (the scheduler plans an event it already has only once).
            kept = {seq for seq, text in rows if text is True}
            again = dict(self.maker.rows([item for item in items if item[0] in kept]))
            rows = [(seq, again[seq] if text is True else text) for seq, text in rows
                    if text is not True or seq in again]
            return self._send(rows), rows
        if status is None:
            self.counters.bump("failed", len(back))
            self.counters.last_error = f"delivery: {reason}"
            return "failed", back
        return self._answered(back if back is not None else rows, status, reason), back or rows

    def _send(self, rows: list[tuple[int, str]]) -> str:
        """POST the rows as one batch: 'delivered', 'rejected' (now dead letters) or 'failed'."""
        body = batch_body([text for _, text in rows])
        self.counters.bump("batches")
        try:
            status, answer = self._delivery.post(body)
        except DeliveryError as exc:
            self.counters.bump("failed", len(rows))
            self.counters.last_error = f"delivery: {exc}"
            return "failed"
        return self._answered(rows, status, answer[:500].decode("utf-8", "replace"))

    def _answered(self, rows: list[tuple[int, Any]], status: int, reason: str) -> str:
        """Count the scheduler's answer to a batch of `rows` (their JSON unless taken); bury refused ones."""
        if 200 <= status < 300:
            self.counters.bump("delivered", len(rows))
            self.counters.last_delivery = time.time()
            return "delivered"
        self.counters.last_error = f"scheduler answered {status}: {reason}"
        if status in REJECTED:
            self.counters.bump("rejected", len(rows))
            self.spool.bury(rows, status, reason)
            orthanc.LogWarning(f"dicomflow: {len(rows)} events refused ({status}), kept as dead letters")
            return "rejected"
        self.counters.bump("failed", len(rows))
        return "failed"
