"""A token bucket in Redis that caps the request rate to CUBE across every worker process."""

from __future__ import annotations

import time

import redis

from dicomflow.keys import service_key

#: Redis keys of the bucket: its state, and the rate an operator may set at run time.
BUCKET_KEY = service_key("chris") + "ratelimit:bucket"
RATE_KEY = service_key("chris") + "ratelimit:rate"

# KEYS[1] bucket hash, KEYS[2] run-time rate; ARGV[1] configured rate, ARGV[2] burst seconds.
# Returns 0 when a token was taken, else the milliseconds to wait before asking again.
# The clock is Redis's own (TIME), so workers on different hosts share one timeline.
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
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return wait
"""


class RateLimiter:
    """Blocks each request until the shared bucket has a token (no-op when the rate is 0)."""

    def __init__(self, connection: redis.Redis, rate: float, burst: float = 1.0):
        self._connection = connection
        self._rate = rate
        self._burst = burst
        self._script = connection.register_script(_TAKE)

    def try_acquire(self) -> float:
        """Take a token if one is there; returns 0.0, or the seconds to wait before trying again."""
        wait_ms = self._script(keys=[BUCKET_KEY, RATE_KEY], args=[self._rate, self._burst])
        return int(wait_ms) / 1000.0

    def acquire(self) -> float:
        """Wait for a token; returns the seconds spent waiting."""
        waited = 0.0
        while (pause := self.try_acquire()) > 0:
            time.sleep(pause)
            waited += pause
        return waited


def set_rate(connection: redis.Redis, rate: float | None) -> None:
    """Set the request rate (per second, all workers) at run time; None: back to CHRIS_RATE_LIMIT."""
    if rate is None:
        connection.delete(RATE_KEY)
    else:
        connection.set(RATE_KEY, str(float(rate)))


def current_rate(connection: redis.Redis, configured: float) -> float:
    """The rate in force: the run-time value when one is set, else the configured one."""
    value = connection.get(RATE_KEY)
    return float(value) if value is not None else configured
