"""Token buckets in Redis that cap a rate across every worker process on every host.

One bucket per named resource (an export destination, CUBE): its state is a Redis hash updated
by one Lua script, on Redis's own clock (``TIME``), so every process that shares the Redis
shares the bucket. The rate comes from configuration and can be overridden at run time by a
Redis key (`set_rate`), which every process reads at its next token: no restart.

A process waiting for a token waits at most ``max_wait`` seconds (`TokenBucket.acquire`), then
gets `RateLimitTimeout` instead of holding its worker slot: what to do then (fail the job
retryably, report a partial result) is the caller's choice.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from dicomflow import keys
from dicomflow.errors import DicomflowError

#: Seconds of the rate a rested bucket lets through at once (PIXL: capacity = rate).
DEFAULT_BURST = 1.0
#: A bucket's name: it goes into a Redis key and onto the command line.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

# KEYS[1] bucket hash, KEYS[2] run-time rate; ARGV[1] configured rate, ARGV[2] burst seconds.
# Returns 0 when a token was taken, else the milliseconds until one will be there. A rate <= 0
# is no limit. Redis's clock (TIME), so processes on different hosts share one timeline; the
# hash expires once a full bucket would be full again, so an idle bucket costs nothing.
_TAKE = """
local rate = tonumber(redis.call('GET', KEYS[2]) or ARGV[1]) or 0
if rate <= 0 then return 0 end
local capacity = math.max(1, rate * tonumber(ARGV[2]))
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.max(1, math.ceil((1 - tokens) / rate * 1000))
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return wait
"""


class RateLimitError(DicomflowError):
    """A rate limit's name or value is malformed."""


class RateLimitTimeout(DicomflowError):
    """No token came within the bounded wait: the caller gives its slot back and retries later.

    Attributes:
        name: the bucket (destination) that had no token.
        waited: seconds waited before giving up.
        rate: the rate in force when it gave up.
    """

    def __init__(self, name: str, waited: float, rate: float):
        self.name, self.waited, self.rate = name, waited, rate
        super().__init__(f"no rate-limit token for {name} within {waited:.1f} s (rate {rate:g}/s, "
                         "all workers): retry later")


@dataclass(frozen=True)
class BucketKeys:
    """The two Redis keys of one bucket: its state and its run-time rate."""

    name: str
    bucket: str
    rate: str

    @classmethod
    def named(cls, name: str) -> BucketKeys:
        """The keys of the bucket `name` (``dicomflow:ratelimit:<name>:bucket|rate``).

        Raises:
            RateLimitError: the name is not letters, digits, ``.``, ``_``, ``-`` (at most 63).
        """
        if not NAME.match(name or ""):
            raise RateLimitError(f"{name!r} is not a rate-limit name (letters, digits, '.', '_', '-'; at most 63)")
        namespace = keys.rate_limit(name)
        return cls(name, namespace + "bucket", namespace + "rate")


def check_rate(rate: float) -> float:
    """`rate` as a float if it is a finite number >= 0 (0: no limit).

    Raises:
        RateLimitError: it is not.
    """
    try:
        value = float(rate)
    except (TypeError, ValueError) as exc:
        raise RateLimitError(f"a rate is a number of instances per second >= 0, not {rate!r}") from exc
    if not math.isfinite(value) or value < 0:
        raise RateLimitError(f"a rate is a finite number >= 0 (0: no limit), not {rate!r}")
    return value


class TokenBucket:
    """One shared bucket: `rate` tokens per second, at most ``rate * burst`` saved up.

    Args:
        connection: the Redis every process of the pipeline shares.
        keys: the bucket's keys (`BucketKeys.named`).
        rate: the configured rate (per second, all processes; 0 = no limit); a run-time
            override in Redis takes precedence.
        burst: seconds of the rate a rested bucket lets through at once (at least one token).
    """

    def __init__(self, connection: redis.Redis, keys: BucketKeys, rate: float, burst: float = DEFAULT_BURST):
        if burst <= 0:
            raise RateLimitError(f"a burst is a number of seconds > 0, not {burst!r}")
        self.connection = connection
        self.keys = keys
        self.configured = check_rate(rate)
        self.burst = float(burst)
        self._script = connection.register_script(_TAKE)

    def try_acquire(self) -> float:
        """Take a token if one is there; return 0.0, or the seconds until one will be."""
        wait_ms = self._script(keys=[self.keys.bucket, self.keys.rate], args=[self.configured, self.burst])
        return int(wait_ms) / 1000.0

    def acquire(self, max_wait: float | None = None, *, sleep: Callable[[float], None] = time.sleep) -> float:
        """Wait for a token, at most `max_wait` seconds (None: as long as it takes).

        Returns:
            the seconds spent waiting.

        Raises:
            RateLimitTimeout: the next token would come later than `max_wait` after the call;
                it gives up as soon as it knows (it does not sleep out the wait first).
        """
        start = time.monotonic()
        while (pause := self.try_acquire()) > 0:
            waited = time.monotonic() - start
            if max_wait is not None and waited + pause > max_wait:
                raise RateLimitTimeout(self.keys.name, waited, self.rate())
            sleep(pause)
        return time.monotonic() - start

    def rate(self) -> float:
        """The rate in force: the run-time override when one is set, else the configured one."""
        return current_rate(self.connection, self.keys, self.configured)


def set_rate(connection: redis.Redis, keys: BucketKeys, rate: float | None) -> None:
    """Override a bucket's rate at run time (every process, at its next token); None removes it.

    Raises:
        RateLimitError: `rate` is not a finite number >= 0.
    """
    if rate is None:
        connection.delete(keys.rate)
    else:
        connection.set(keys.rate, repr(check_rate(rate)))


def override(connection: redis.Redis, keys: BucketKeys) -> float | None:
    """The run-time rate set for a bucket, or None."""
    value = connection.get(keys.rate)
    return None if value is None else float(value)


def current_rate(connection: redis.Redis, keys: BucketKeys, configured: float) -> float:
    """The rate in force: the run-time override when one is set, else `configured`."""
    value = override(connection, keys)
    return configured if value is None else value
