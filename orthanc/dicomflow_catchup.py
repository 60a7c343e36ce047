"""Catching up with Orthanc's change log after a crash, and reading stable series/studies from it.

What the sender has taken from memory but not yet delivered or spooled, and what is still
queued, dies with the process on a SIGKILL or a crash. Orthanc's own change log
(`/changes`, in its database) does not: the plugin keeps a checkpoint, a change sequence
number up to which every stored instance was handed over, and at start re-reads the
instances stored after it from Orthanc (`"replay": true`: the scheduler skips the ones it
already scheduled). With ``"StableEvents": "changes"`` the same log gives the stable
series/studies while Orthanc runs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import orthanc
from dicomflow_capture import KIND_REPLAY, Capture
from dicomflow_counters import Counters
from dicomflow_eventmaker import EventMaker
from dicomflow_settings import CHANGES, LUA, OFF, PluginSettings
from dicomflow_spool import Spool

#: Orthanc change types the catch-up turns into events again.
_REPLAYED_CHANGES = {"NewInstance": KIND_REPLAY, "StableSeries": "series", "StableStudy": "study"}
#: Orthanc change types the change reader turns into events while Orthanc runs.
_STABLE_CHANGES = {"StableSeries": "series", "StableStudy": "study"}
#: Changes read from Orthanc's log per REST call.
_CHANGES_PAGE = 1000
#: Orthanc's answer to API calls while it is still initialising (the sender starts with the plugin).
_NOT_YET = 2038
#: At start: how long after its change is logged an on-stored callback (run by Orthanc right
#: after the commit, in the same thread) has surely queued its event (s).
START_GRACE = 1.0


class CatchUp:
    """The checkpoints in Orthanc's change log, the read-back at start, and the change reader.

    Driven by the sender thread: `before_send` and `advance` around each batch.
    """

    def __init__(self, settings: PluginSettings, counters: Counters, capture: Capture, maker: EventMaker,
                 spool: Spool, stopping: threading.Event):
        self.settings = settings
        self.counters = counters
        self.capture = capture
        self.maker = maker
        self.spool = spool
        self._stopping = stopping
        #: Orthanc's change sequence number up to which every instance was handed over (see _catch_up).
        self.checkpoint: int | None = None
        #: The last change the change reader has handled (stable series/studies queued up to it).
        self._cursor: int | None = None
        self._next_poll = 0.0
        #: Whether this start's catch-up succeeded; until then the checkpoint does not move.
        self.caught_up = False
        #: Orthanc's last change when the catch-up began, and when it may read back before it.
        self._catch_up_last: int | None = None
        self._catch_up_due = 0.0
        #: When a failed catch-up is tried again (monotonic).
        self._next_catch_up = 0.0
        self._pending_checkpoint: tuple[int, float, int | None] | None = None
        #: With stable events from Lua: the change up to which every stable series/study was
        #: handed over (it follows the checkpoint StableGrace behind), and its pending move.
        self.stable_checkpoint: int | None = None
        self._pending_stable: tuple[int, float, int | None] | None = None
        self._last_checkpoint_at = 0.0

    def wait_for_orthanc(self) -> None:
        """The sender starts with the plugin, before Orthanc's database is open: wait until it is."""
        while not self._stopping.is_set():
            try:
                self._last_change()  # the database: /system answers before it is open
                return
            except orthanc.OrthancException as exc:
                if not exc.args or exc.args[0] != _NOT_YET:
                    return  # another error: the catch-up reports it, and is retried
            self._stopping.wait(0.01)  # briefly: see _first_checkpoint

    def before_send(self) -> None:
        """The sender's step before each batch: the catch-up until it succeeded, then the change reader."""
        if not self.caught_up and time.monotonic() >= self._next_catch_up:
            try:
                if self._catch_up_last is None:
                    self._begin_catch_up()
                elif time.monotonic() >= self._catch_up_due:
                    self._catch_up()
            except Exception as exc:  # noqa: BLE001 - retried; until then the checkpoint does not move
                self._catch_up_last = None
                self._next_catch_up = time.monotonic() + self.settings.retry_max_delay
                self.counters.last_error = f"catch-up: {type(exc).__name__}: {exc}"
                orthanc.LogError(f"dicomflow: {self.counters.last_error}")
        if self.caught_up and self.settings.stable_events == CHANGES and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.settings.change_poll_interval
            try:
                self._read_changes()
            except Exception as exc:  # noqa: BLE001 - read again from the same change next time
                self.counters.last_error = f"change log: {type(exc).__name__}: {exc}"
                orthanc.LogError(f"dicomflow: {self.counters.last_error}")

    def advance(self) -> None:
        """The sender's step after each batch: move the checkpoints once caught up."""
        if self.caught_up:
            try:
                self._advance_checkpoint(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - only the checkpoint lags; delivery goes on
                self.counters.last_error = f"checkpoint: {type(exc).__name__}: {exc}"

    # ---- the catch-up at start ------------------------------------------------------------

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
            self._save_stable_checkpoint(self.checkpoint)

    def _first_checkpoint(self, last: int) -> int:
        """`last`, or just below the first instance this run's callback saw before it.

        Instances may be stored between the opening of Orthanc's database and the sender's
        first read of its change log; their events are still in memory, so the first
        checkpoint must not pass them (a crash would lose them). They were stored moments
        ago: their changes are among the last few.
        """
        seen = set(self.capture.seen or ())  # after reading `last`: every callback of a change up to it that ran
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
        and `before_send` starts over later.
        """
        last = self._catch_up_last
        stored = self.spool.get_state("checkpoint")
        stable = self.spool.get_state("stableCheckpoint")  # absent in a spool from before session 8
        self.stable_checkpoint = None if stable is None else int(stable)
        # Changes up to `last` logged by this process have had their on-stored callbacks run
        # within the grace time: their instances are in `seen` (no replay needed), numbered
        # below the marker taken here, so the checkpoint passes `last` once they are delivered.
        if stored is not None and int(stored) > last:
            orthanc.LogWarning(f"dicomflow: Orthanc's change log ends at {last}, before the checkpoint "
                               f"{stored} (a new database?): nothing to catch up")
        replayed = 0
        if stored is not None and int(stored) <= last:
            since_stable = int(stored) if stable is None else min(int(stable), int(stored))
            replayed = self._replay(int(stored), since_stable, last, self.capture.seen | self.spool.instance_ids())
        if self._stopping.is_set():
            return  # stopped half-way: the next start catches up again from the same checkpoint
        self.counters.bump("replayed", replayed)
        if replayed:
            orthanc.LogWarning(f"dicomflow: {replayed} instances stored after change {stored} were never "
                               "handed over (Orthanc stopped abruptly?): read back from Orthanc and spooled")
        self._pending_checkpoint = (last, time.monotonic(), self.capture.marker())
        if self.settings.stable_events == LUA:
            # The Lua engine may still be working through changes up to `last`: its marker
            # is taken StableGrace from now.
            self._pending_stable = (last, time.monotonic(), None)
        self._cursor = last
        self.caught_up = True
        self.capture.seen = None

    def _change_pages(self, since: int, last: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """Orthanc's changes after `since` (up to `last`), oldest first, a page at a time."""
        while not self._stopping.is_set():
            page = json.loads(orthanc.RestApiGet(f"/changes?since={since}&limit={_CHANGES_PAGE}"))
            changes = [c for c in page["Changes"] if last is None or c["Seq"] <= last]
            self.counters.bump("changesRead", len(changes))
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
        if self.settings.stable_events == OFF:
            replayed_changes = {"NewInstance": KIND_REPLAY}
            since_stable = since
        new_seq = self.capture.new_seq
        for changes in self._change_pages(min(since, since_stable), last):
            items = [(new_seq(), replayed_changes[c["ChangeType"]], c["ID"], None, None, None, None, None,
                      time.time()) for c in changes
                     if c["ChangeType"] in replayed_changes and c["ID"] not in skip
                     and c["Seq"] > (since if c["ChangeType"] == "NewInstance" else since_stable)]
            self.maker.spool_items(items)
            replayed += sum(1 for item in items if item[1] == KIND_REPLAY)
        return replayed

    # ---- stable series/studies from the change log ("StableEvents": "changes") --------------

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
                    self.capture.offer((kind, change["ID"], None, None, None, None, None, time.time()))
            self._cursor = changes[-1]["Seq"]

    # ---- moving the checkpoints -------------------------------------------------------------

    def _save_checkpoint(self, change: int) -> None:
        if change != self.checkpoint:
            self.spool.set_state("checkpoint", str(change))
            self.checkpoint = change
        if self.settings.stable_events == CHANGES:
            # The change reader had queued every stable series/study up to it: both move together.
            self._save_stable_checkpoint(change)

    def _save_stable_checkpoint(self, change: int | None) -> None:
        if change is not None and change != self.stable_checkpoint:
            self.spool.set_state("stableCheckpoint", str(change))
            self.stable_checkpoint = change

    def _advance_checkpoint(self, now: float) -> None:
        """Every CheckpointInterval: note Orthanc's last change; once the events of every
        instance logged up to it are delivered or spooled, make it the checkpoint.

        With stable series/studies from the Lua script, the stable checkpoint follows the
        same way with StableGrace for the callbacks' time (one move at a time).
        """
        lua = self.settings.stable_events == LUA
        if self._pending_checkpoint is None:
            if now - self._last_checkpoint_at >= self.settings.checkpoint_interval:
                # Lua: Orthanc's last change. Change log: the reader's cursor (every stable
                # series/study up to it is queued already).
                change = self._cursor if self.settings.stable_events == CHANGES else self._last_change()
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
                return (change, noted, self.capture.marker()), None
            return pending, None
        if self.capture.low_water() >= marker:
            return None, change
        return pending, None
