"""Series and study completion, owned by the pipeline: pushes kept in Redis, fired StableAge after their last instance.

A **push** is one sender's delivery of a series (or study): it opens with the first instance
event from that calling AE title for that SeriesInstanceUID (StudyInstanceUID) while none is
open, and completes `ORTHANC_STABLE_AGE` seconds after its last instance reached the
scheduler. Completion fires one series (study) event carrying the push's id and the Orthanc
ids of the instances it delivered. An instance that comes after that opens a new push, so a
re-send (after deletion, or from another AE title) is always a new push: Orthanc's own
STABLE_SERIES forgets unstable resources at shutdown and never fires for instances it
already holds.

Everything lives in Redis (with the job queue's persistence): the push hash, its members and
one sorted set of due times. The instance batch that extends a push and the series event
that closes it are each one atomic script, and a push is closed only if no instance came
since it was read (`Completer.fire_due`), so a restart of Orthanc, the scheduler or Redis
between the two loses nothing, and two schedulers never fire one push twice.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import redis
from pydantic import ValidationError

from dicomflow import keys
from dicomflow.events import Event, Level

if TYPE_CHECKING:
    from scheduler.enqueue import BatchWrite, Enqueuer, EventResult
    from scheduler.registry import RegistryHolder

log = logging.getLogger(__name__)

#: Headers of one instance that do not describe its series (study): left out of the
#: series (study) event built from the push's first instance.
_NOT_SERIES = frozenset({"SOPInstanceUID", "InstanceNumber", "AcquisitionNumber", "ImageType", "NumberOfFrames",
                         "Rows", "Columns"})
_NOT_STUDY = _NOT_SERIES | {"SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
                            "ProtocolName", "NumberOfSeriesRelatedInstances", "SOPClassUID", "BodyPartExamined"}
_LEVEL_KEYWORDS = {Level.SERIES: _NOT_SERIES, Level.STUDY: _NOT_STUDY}
#: `server`: the receiving Orthanc's name (a push is per receiver, so all its instances are on that one).
_ORTHANC_LEVELS = {Level.SERIES: ("series", "study", "patient", "server"), Level.STUDY: ("study", "patient", "server")}
#: Due pushes read per poll.
FIRE_BATCH = 100
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_push_id(now: float) -> str:
    """A ULID: 26 Crockford base-32 characters, ordered by time, unique without coordination."""
    value = (int(now * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


def _template(event: Event, level: Level) -> str:
    """The series (study) event, minus its push id and members, as JSON."""
    drop = _LEVEL_KEYWORDS[level]
    orthanc = {name: event.orthanc[name] for name in _ORTHANC_LEVELS[level] if event.orthanc.get(name)}
    return json.dumps({
        "level": level.value,
        "headers": {k: v for k, v in event.headers.items() if k not in drop},
        "orthanc": orthanc, "remoteAet": event.remoteAet, "remoteIp": event.remoteIp, "calledAet": event.calledAet,
    }, separators=(",", ":"))


class PushTracker:
    """Adds to an instance batch's atomic write what keeps its pushes open."""

    def __init__(self, stable_age: float):
        self.stable_age = stable_age

    def track(self, pipe: BatchWrite, events: Iterable[Event], levels: Iterable[Level], now: float) -> None:
        """Extend (or open) the series/study push of each instance event, for the levels any
        service listens to. One `PUSH` word list per event and level (see scripts.APPLY)."""
        levels = tuple(levels)
        if not levels:
            return
        stamp, due = f"{now:.6f}", f"{now + self.stable_age:.6f}"
        seen: set[str] = set()
        for event in events:
            member = str(event.orthanc.get("instance") or "")
            for level in levels:
                uid = str(event.headers.get("SeriesInstanceUID" if level is Level.SERIES else "StudyInstanceUID")
                          or "").strip()
                if not uid:
                    continue
                key = keys.push(level.value, event.sender, uid)
                if key in seen:
                    pipe.add("PUSH", key, keys.push_members(key), "", stamp, due, "", member)
                    continue
                seen.add(key)
                # The id and template are kept only by a push this batch opens (HSETNX).
                pipe.add("PUSH", key, keys.push_members(key), new_push_id(now), stamp, due,
                         _template(event, level), member)


class Completer:
    """Fires the series/study event of every push whose stable age has passed."""

    def __init__(self, connection: redis.Redis, enqueuer: Enqueuer, registry: RegistryHolder, poll: float):
        self.connection = connection
        self.enqueuer = enqueuer
        self.registry = registry
        self.poll = poll
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.last_error: str | None = None

    def fire_due(self, now: float | None = None) -> list[EventResult]:
        """Close every push due at `now` (default: the current time) and enqueue its event.

        A push that received an instance after it was read here is left for the next call
        (its due time moved). Returns the results of the events fired.

        Raises:
            redis.RedisError: Redis failed; nothing of the push was lost (it is still due).
        """
        now = time.time() if now is None else now
        due = self.connection.zrangebyscore(keys.PUSHES_DUE, "-inf", now, start=0, num=FIRE_BATCH)
        results = []
        for raw_key in due:
            key = raw_key.decode()
            result = self._fire(key)
            if result is not None:
                results.append(result)
        return results

    def _fire(self, key: str) -> EventResult | None:
        from scheduler.enqueue import EventsBusy, PushMoved

        pipe = self.connection.pipeline(transaction=False)
        pipe.hgetall(key)
        pipe.smembers(keys.push_members(key))
        record, members = pipe.execute()
        record = {k.decode(): v.decode() for k, v in record.items()}
        cleanup = [("ZREM", keys.PUSHES_DUE, key), ("DEL", key, keys.push_members(key))]
        if "event" not in record or "id" not in record:
            # A due entry without its push (deleted by hand, or expired): nothing to fire.
            self.connection.zrem(keys.PUSHES_DUE, key)
            log.warning("push %s was due but has no record; dropped the due entry", key)
            return None
        raw = json.loads(record["event"])
        raw["orthanc"]["instances"] = sorted(m.decode() for m in members)
        raw["push"] = record["id"]
        raw["receivedAt"] = float(record["last"])
        raw["pushCount"] = int(record.get("count", 0))
        try:
            event = Event.model_validate(raw)
        except ValidationError as exc:
            # Cannot happen for a push this code opened; never retried forever, never silent.
            self.connection.lpush(keys.EVENT_ERRORS, json.dumps({"time": time.time(), "error": str(exc),
                                                                  "event": raw}, default=str))
            self.connection.zrem(keys.PUSHES_DUE, key)
            log.error("push %s cannot become an event (%s); recorded in the event errors", key, exc)
            return None
        try:
            [result] = self.enqueuer.submit([event], self.registry.current(),
                                            guards=[(key, "count", record["count"])], extra=cleanup)
        except (PushMoved, EventsBusy):
            return None  # an instance came meanwhile (or another scheduler fires it): next poll
        log.info("push %s complete: %s event %s with %d instance(s): %s", record["id"], event.level.value,
                 event.uid, len(members), result.status)
        return result

    def start(self) -> None:
        """Fire due pushes every `poll` seconds in a daemon thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dicomflow-pushes", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self.fire_due()
                self.last_error = None
            except redis.RedisError as exc:
                # Redis away: the pushes are still there (or will be, with the AOF); try again.
                if self.last_error is None:
                    log.error("cannot fire completed pushes: %s", exc)
                self.last_error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # noqa: BLE001 - the thread's boundary: report, keep firing the others
                log.exception("firing completed pushes failed")
                self.last_error = f"{type(exc).__name__}: {exc}"

    def status(self) -> dict[str, Any]:
        """Open pushes and the next due time, for the status API."""
        head = self.connection.zrange(keys.PUSHES_DUE, 0, 0, withscores=True)
        return {"open": self.connection.zcard(keys.PUSHES_DUE),
                "nextDue": head[0][1] if head else None, "lastError": self.last_error}
