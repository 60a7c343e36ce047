"""The CUBE service's rate limit: the shared token bucket (`dicomflow.ratelimit`) under the
ChRIS service's own keys, across every worker process on every host."""

from __future__ import annotations

import redis

from dicomflow.keys import service_key
from dicomflow.ratelimit import BucketKeys, TokenBucket
from dicomflow.ratelimit import current_rate as _current_rate
from dicomflow.ratelimit import set_rate as _set_rate

#: Redis keys of the bucket: its state, and the rate an operator may set at run time (kept
#: where they were before the bucket was shared, so a rate set at run time survives upgrades).
KEYS = BucketKeys("chris", service_key("chris") + "ratelimit:bucket", service_key("chris") + "ratelimit:rate")


def limiter(connection: redis.Redis, rate: float, burst: float = 1.0) -> TokenBucket:
    """The bucket every request to CUBE takes a token from (rate 0: no limit)."""
    return TokenBucket(connection, KEYS, rate, burst)


def set_rate(connection: redis.Redis, rate: float | None) -> None:
    """Set the request rate (per second, all workers) at run time; None: back to CHRIS_RATE_LIMIT."""
    _set_rate(connection, KEYS, rate)


def current_rate(connection: redis.Redis, configured: float) -> float:
    """The rate in force: the run-time value when one is set, else the configured one."""
    return _current_rate(connection, KEYS, configured)
