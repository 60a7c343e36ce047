"""Per-series progress in Redis: announced, stored, registered, errors; read by the scheduler's API."""

from __future__ import annotations

import os
import time
from enum import Enum
from typing import Any

import redis

from dicomflow.keys import service_key

_KEYS = service_key("chris")
#: Sorted set `<pacs_name>/<SeriesInstanceUID>` -> last update (unix time): the listing of
#: recent series (a series sent by two PACS is two entries: each has its folder and registration).
INDEX_KEY = _KEYS + "series-index"
#: Progress of a series is kept this long after its last change (seconds).
PROGRESS_TTL = 7 * 86400
INDEX_LENGTH = 10000
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class SeriesState(str, Enum):
    """Where a series is in the store/register flow."""

    RECEIVING = "receiving"  # instances arriving, not registered yet
    REGISTERED = "registered"  # series mode: CUBE has the series
    DONE = "done"  # every instance handled; errors, if any, are listed
    GROWN = "grown"  # instances arrived after the series was registered (not in CUBE)


def new_attempt_id(now: float | None = None) -> str:
    """A ULID (time-ordered, 26 Crockford base-32 characters) naming one push of a series."""
    value = (int((now if now is not None else time.time()) * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


#: What every change of a series' record does too (the end of the scripts below): set the facts
#: given, list the series as recently updated (the index trimmed to INDEX_LENGTH), note its
#: sender, and keep each of its keys PROGRESS_TTL more. KEYS: info, done, stored, registered,
#: errors, regdone, senders, index (as SeriesProgress._run passes them); ARGV: 1 SOPInstanceUID, 2 instance
#: key, 3 index member, 4 pacs_name, 5 now, 6 TTL, 7 index length, 8 the attempt id a first
#: instance starts, then field/value pairs. One script, not a MULTI of ~17 commands: the worker
#: packs and parses one command per step (issue 23).
_TOUCH = """
local fields = {'updatedAt', ARGV[5]}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('ZADD', KEYS[8], ARGV[5], ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[8], 0, -tonumber(ARGV[7]) - 1)
redis.call('SADD', KEYS[7], ARGV[4])
for i = 1, 7 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
"""
#: An instance written to storage. Returns {new SOP (0/1), instances stored, the facts hash
#: as a flat list}.
_STORED = """
local added = redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
local count = redis.call('SCARD', KEYS[3])
redis.call('HSETNX', KEYS[1], 'attempt', ARGV[8])
redis.call('HSETNX', KEYS[1], 'state', 'receiving')
""" + _TOUCH + """
return {added, count, redis.call('HGETALL', KEYS[1])}
"""
#: Only that (the record's other changes, in a transaction with it).
_TOUCH_ONLY = _TOUCH + "return 1"
#: An instance registered (pacsfiles mode). Returns how many of the series' instances are.
_REGISTERED = """
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[6], ARGV[2])
redis.call('HDEL', KEYS[5], ARGV[2])
local count = redis.call('SCARD', KEYS[4])
""" + _TOUCH + """
return count
"""


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def _senders_key(series_uid: str) -> str:
    """Set of the pacs_names a series has progress for."""
    return f"{_KEYS}series-pacs:{series_uid}"


class SeriesProgress:
    """The Redis record of one series from one PACS (pacs_name, usually the sender's AE title):
    a hash of facts plus sets of instances. The same series from another PACS is another record,
    as it is another folder in CUBE's storage and another registration."""

    def __init__(self, connection: redis.Redis, pacs_name: str, series_uid: str):
        self.connection = connection
        self.pacs_name = pacs_name
        self.series_uid = series_uid
        base = f"{_KEYS}series:{pacs_name}:{series_uid}"
        self.info_key = base
        self.done_key = base + ":done"  # instance keys handled (stored or failed)
        self.stored_key = base + ":stored"  # SOPInstanceUIDs written to storage
        self.registered_key = base + ":registered"  # SOPInstanceUIDs registered (pacsfiles mode)
        self.errors_key = base + ":errors"  # instance key -> message
        self.regdone_key = base + ":regdone"  # instance keys whose registration is settled
        self._all = (self.info_key, self.done_key, self.stored_key, self.registered_key, self.errors_key,
                     self.regdone_key)

    def _touch(self, pipe: Any, **fields: Any) -> None:
        """Add _TOUCH (with `fields`) to the transaction `pipe`."""
        self._run(_TOUCH_ONLY, "", "", fields=[item for pair in fields.items() for item in pair], client=pipe)

    def _run(self, script: str, sop_uid: str, instance_key: str, attempt: str = "",
             fields: list[Any] | None = None, client: Any = None) -> Any:
        """One of the scripts above on this series' keys (see _TOUCH for its arguments), at
        once or, with `client` a pipeline, in it."""
        keys = [*self._all, _senders_key(self.series_uid), INDEX_KEY]
        args = [sop_uid, instance_key, f"{self.pacs_name}/{self.series_uid}", self.pacs_name, time.time(),
                PROGRESS_TTL, INDEX_LENGTH, attempt, *(fields or ())]
        return self.connection.register_script(script)(keys=keys, args=args, client=client)

    def info(self) -> dict[str, str]:
        """The facts hash (pacs_name, path, announced, attempt, state, ...)."""
        return _decode(self.connection.hgetall(self.info_key))

    def stored(self, instance_key: str, sop_uid: str, pacs_name: str, folder: str,
               announced: int | None) -> tuple[int, bool, dict[str, str]]:
        """Count an instance as written into `folder` (recording the series, and its push
        attempt, on its first instance); returns (instances stored, whether this SOP is new,
        the facts hash after it), in one round trip."""
        fields: list[Any] = ["pacs_name", pacs_name, "path", folder]
        if announced is not None:
            fields += ["announced", announced]
        added, count, facts = self._run(_STORED, sop_uid, instance_key, new_attempt_id(), fields)
        return int(count), bool(added), _decode(dict(zip(facts[::2], facts[1::2])))

    def failed(self, instance_key: str, message: str) -> None:
        """Record an instance that could not be stored or registered.

        Either way it counts as handled: series jobs stop waiting for it.
        """
        pipe = self.connection.pipeline()
        pipe.sadd(self.done_key, instance_key)
        pipe.sadd(self.regdone_key, instance_key)
        pipe.hset(self.errors_key, instance_key, message[:2000])
        self._touch(pipe)
        pipe.execute()

    def registered(self, instance_key: str, sop_uid: str) -> int:
        """Count an instance as registered (pacsfiles mode); returns how many are."""
        return int(self._run(_REGISTERED, sop_uid, instance_key))

    def series_registered(self, ndicom: int) -> None:
        """Record the series registration (series mode): ndicom files are in CUBE now."""
        pipe = self.connection.pipeline()
        pipe.hdel(self.info_key, "grown")
        self._touch(pipe, state=SeriesState.REGISTERED.value, registeredCount=ndicom,
                    registeredAt=time.time())
        pipe.execute()

    def grown(self, extra: int) -> None:
        """Record instances stored after the series was registered (CUBE does not have them)."""
        pipe = self.connection.pipeline()
        self._touch(pipe, state=SeriesState.GROWN.value, grown=extra)
        pipe.execute()

    def finish(self, attempted: int) -> None:
        """Close the current push attempt: the next instance of this series starts a new one."""
        pipe = self.connection.pipeline()
        pipe.hdel(self.info_key, "attempt")
        pipe.hget(self.info_key, "state")
        self._touch(pipe, attempted=attempted, finishedAt=time.time())
        state = pipe.execute()[1]
        if state in (None, SeriesState.RECEIVING.value.encode()):
            self.connection.hset(self.info_key, "state", SeriesState.DONE.value)

    def pending(self, instance_keys: list[str], registration: bool = False) -> list[str]:
        """Which of `instance_keys` are not settled yet: not stored nor failed, or with
        `registration`, not registered nor failed."""
        if not instance_keys:
            return []
        key = self.regdone_key if registration else self.done_key
        flags = self.connection.smismember(key, instance_keys)
        return [k for k, flag in zip(instance_keys, flags) if not flag]

    def has_marker(self, attempt: str, marker: str) -> bool:
        """True when the marker of this push attempt is registered already."""
        return bool(self.connection.hexists(self.info_key, f"marker:{marker}:{attempt}"))

    def marked(self, attempt: str, marker: str) -> None:
        """Remember that the marker of this push attempt is registered."""
        self.connection.hset(self.info_key, f"marker:{marker}:{attempt}", "1")

    def counts(self) -> tuple[int, int, int]:
        """(stored, registered, errors) right now."""
        pipe = self.connection.pipeline()
        pipe.scard(self.stored_key)
        pipe.scard(self.registered_key)
        pipe.hlen(self.errors_key)
        stored, registered, errors = pipe.execute()
        return int(stored), int(registered), int(errors)


def series_progress(connection: redis.Redis, pacs_name: str, series_uid: str) -> dict[str, Any] | None:
    """What a client needs to know about one series from one PACS; None when it is unknown (or expired).

    Keys: SeriesInstanceUID, pacs_name, path (the series folder in CUBE's storage), state,
    announced (NumberOfSeriesRelatedInstances or None), stored, registered (files CUBE has),
    errors ({instance: message}), grownAfterRegistration, updatedAt.
    """
    series = SeriesProgress(connection, pacs_name, series_uid)
    info = series.info()
    if not info:
        return None
    stored, registered_files, _ = series.counts()
    errors = _decode(connection.hgetall(series.errors_key))
    registered = int(info["registeredCount"]) if "registeredCount" in info else registered_files
    return {
        "SeriesInstanceUID": series_uid,
        "pacs_name": pacs_name,
        "path": info.get("path"),
        "state": info.get("state", SeriesState.RECEIVING.value),
        "announced": int(info["announced"]) if "announced" in info else None,
        "stored": stored,
        "registered": registered,
        "errors": errors,
        "grownAfterRegistration": int(info.get("grown", 0)),
        "attempted": int(info["attempted"]) if "attempted" in info else None,
        "updatedAt": float(info.get("updatedAt", 0.0)),
    }


def series_senders(connection: redis.Redis, series_uid: str) -> list[dict[str, Any]]:
    """The progress of one series from every PACS that sent it, by pacs_name."""
    names = sorted(n.decode() for n in connection.smembers(_senders_key(series_uid)))
    found = (series_progress(connection, name, series_uid) for name in names)
    return [item for item in found if item is not None]


def recent_series(connection: redis.Redis, limit: int = 50) -> list[dict[str, Any]]:
    """The progress of the most recently updated series (per PACS), newest first."""
    entries = connection.zrevrange(INDEX_KEY, 0, max(limit, 1) - 1)
    found = (series_progress(connection, *entry.decode().rsplit("/", 1)) for entry in entries)
    return [item for item in found if item is not None]
