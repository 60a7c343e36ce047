"""The capture: Orthanc's callbacks put each stored instance (or stable series/study) on a
numbered in-memory queue, and nothing slow happens on Orthanc's ingest path.

An item is a tuple ``(seq, kind, Orthanc id, headers, remote AET, remote IP, called AET,
transfer syntax, received at)``; the sequence number orders the spool, so events written
later by another path still come out in the order Orthanc received them.
"""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import orthanc
from dicomflow_counters import Counters
from dicomflow_settings import JSON, RAW, PluginSettings

KIND_INSTANCE = "instance"
#: An instance re-read from Orthanc at start: stored before a crash, never handed over.
KIND_REPLAY = "replay"
#: An Orthanc resource id (a SHA-1 in five dash-separated groups of 8 hex digits).
_ORTHANC_ID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}")
#: How long the first batch after a quiet spell waits for more events (s); each batch of a
#: burst waits twice as long as the one before, up to MaxBatchDelay. A study's first instance
#: then reaches the scheduler in ~50 ms instead of up to MaxBatchDelay (0.5 s: a tenth of the
#: time CUBE takes for a whole series, issue 23), while a long burst is still sent in
#: MaxBatchDelay batches.
FIRST_LINGER = 0.05


class Capture:
    """The numbered queue Orthanc's callbacks fill and the sender empties."""

    def __init__(self, settings: PluginSettings, counters: Counters, first_seq: int, raw: bool,
                 overflow: Callable[[list[tuple]], None]):
        """Args:
            first_seq: the sequence number of the first item (after the spool's last).
            raw: capture the file's bytes (read later), else Orthanc's JSON of the instance.
            overflow: spools items when the queue is full (called under the sequence lock).
        """
        self.settings = settings
        self.counters = counters
        self.raw = raw
        self._overflow = overflow
        # Sequence numbers order the spool; one is given to an item as it enters the queue,
        # under a lock, so the queue is always in sequence order (see low_water).
        self.next_seq = first_seq
        self.seq_lock = threading.Lock()
        #: The first sequence number of the items the sender has taken and not yet delivered or spooled.
        self.inflight: int | None = None
        #: The first sequence number of items a sender error may have dropped (the checkpoint stays below).
        self.lost_from: int | None = None
        #: Instance ids the callback saw until the catch-up succeeded (they need no replay); None after.
        self.seen: set[str] | None = set()
        # A deque, not queue.Queue: append/popleft are atomic and wake nobody, so the
        # callback never hands the GIL to the sender per event; the sender polls every
        # MaxBatchDelay and is woken early only when a full batch waits, or by the first
        # event after a quiet spell (once per burst).
        self.queue: collections.deque = collections.deque()
        self.batch_ready = threading.Event()
        #: True while the sender waits on an empty queue: the next event wakes it.
        self.quiet = False
        #: How long the sender's next batch waits for more events (FIRST_LINGER .. MaxBatchDelay).
        self.linger = settings.max_batch_delay
        self.last_batch_at = 0.0
        self._json_format = orthanc.DicomToJsonFormat.HUMAN
        self._json_flags = orthanc.DicomToJsonFlags.NONE

    # ---- Orthanc callbacks (Orthanc's threads) -------------------------------------------

    def on_stored(self, dicom: Any, instance_id: str) -> None:
        """Capture the instance's headers and context, queue them; nothing slow happens here."""
        try:
            if self.raw:
                # A copy of the bytes: ~free. The transfer syntax is read from them later (asking
                # Orthanc for it took ~6 µs here); the rare syntax the reader leaves to Orthanc
                # (big endian, deflated) is then read from Orthanc's REST API.
                headers, syntax = (RAW, dicom.GetInstanceData()), None
            else:
                syntax = dicom.GetInstanceTransferSyntaxUid()
                headers = (JSON, dicom.GetInstanceAdvancedJson(self._json_format, self._json_flags,
                                                               self.settings.max_string_length))
            metadata = dicom.GetInstanceMetadata  # None where absent (an upload has no called AE)
            item = (
                KIND_INSTANCE, instance_id, headers,
                dicom.GetInstanceRemoteAet(), metadata("RemoteIP"), metadata("CalledAET"),
                syntax,
                time.time(),
            )
            self.counters.bump("received")
            seen = self.seen
            if seen is not None:
                seen.add(instance_id)
            self.offer(item)
        except Exception as exc:  # noqa: BLE001 - the boundary: nothing may raise into Orthanc's ingest path
            self.counters.bump("callbackErrors")
            self.mark_lost(None)  # the checkpoint stays here: the next start reads it back from Orthanc
            self.counters.last_error = f"on-stored {instance_id}: {type(exc).__name__}: {exc}"
            orthanc.LogError(f"dicomflow: {self.counters.last_error}")

    def on_stable(self, level: str, resource_id: str) -> bool:
        """Queue the event of a series/study Orthanc declared stable (the Lua script's call).

        False (nothing queued) when `level` or `resource_id` is not one Orthanc would send.
        """
        if level not in ("series", "study") or not _ORTHANC_ID.fullmatch(resource_id):
            return False
        self.offer((level, resource_id, None, None, None, None, None, time.time()))
        self.counters.bump("stableFromLua")
        return True

    # ---- the queue ------------------------------------------------------------------------

    def offer(self, rest: tuple) -> None:
        """Number an item and queue it (or spool it when the queue is full)."""
        with self.seq_lock:
            item = (self.next_seq, *rest)
            self.next_seq += 1
            length = len(self.queue)
            if length < self.settings.queue_size:
                self.queue.append(item)
                if length + 1 == self.settings.batch_size or (length == 0 and self.quiet):
                    self.batch_ready.set()
                return
            # Never dropped: the overflow goes to disk, ordered by its sequence number (under
            # the lock, so that low_water never sees it neither queued nor spooled; rare).
            self.counters.bump("overflow")
            try:
                self._overflow([item])
            except BaseException:
                self._lower_lost_from(item[0])
                raise

    def new_seq(self) -> int:
        """A sequence number for an item that does not go through the queue (the catch-up's)."""
        with self.seq_lock:
            self.next_seq += 1
            return self.next_seq - 1

    def marker(self) -> int:
        """The next sequence number: every item queued so far is numbered below it."""
        with self.seq_lock:
            return self.next_seq

    def mark_lost(self, seq: int | None) -> None:
        """Items from `seq` on (None: the next one) may be gone from memory: the checkpoint stays below."""
        with self.seq_lock:
            self._lower_lost_from(seq)

    def _lower_lost_from(self, seq: int | None) -> None:
        """`mark_lost` for a caller that holds `seq_lock`."""
        seq = self.next_seq if seq is None else seq
        self.lost_from = seq if self.lost_from is None else min(self.lost_from, seq)

    def first_queued(self) -> int:
        """The sequence number of the oldest queued item (the next one when the queue is empty).

        Under the lock an overflowing callback spools with (see offer): every item numbered
        below it is then delivered, spooled, or held by the sender.
        """
        with self.seq_lock:
            try:
                return self.queue[0][0]  # the queue is in sequence order
            except IndexError:
                return self.next_seq

    def low_water(self) -> int:
        """The lowest sequence number not yet delivered or spooled, between two sends."""
        first = self.first_queued()
        lost = self.lost_from
        return first if lost is None else min(first, lost)

    def take(self, limit: int) -> list[tuple]:
        """Pop up to `limit` queued items, oldest first."""
        items = []
        pop = self.queue.popleft
        try:
            while len(items) < limit:
                items.append(pop())
        except IndexError:
            pass
        if items and self.inflight is None:
            self.inflight = items[0][0]
        return items

    def collect(self) -> list[tuple]:
        """Up to BatchSize queued items, once a batch is full or its linger has passed: after a
        quiet spell FIRST_LINGER, then twice as long per batch up to MaxBatchDelay. Returns []
        after MaxBatchDelay without events (the sender's other work runs between calls)."""
        limit = self.settings.batch_size
        if not self.queue:
            self.quiet = True  # the first event wakes the sender (offer)
            self.batch_ready.wait(self.settings.max_batch_delay)
            self.quiet = False
            self.batch_ready.clear()
            if not self.queue:
                return []
            if time.monotonic() - self.last_batch_at >= self.settings.max_batch_delay:
                self.linger = min(FIRST_LINGER, self.settings.max_batch_delay)  # a new burst
        if len(self.queue) < limit:
            self.batch_ready.wait(self.linger)
        self.batch_ready.clear()
        self.linger = min(self.linger * 2, self.settings.max_batch_delay)
        items = self.take(limit)
        if items:
            self.last_batch_at = time.monotonic()
        return items

    def queued_ids(self) -> list[str]:
        """Orthanc ids of the queued items (retention keeps what they are about)."""
        return [item[2] for item in list(self.queue)]
