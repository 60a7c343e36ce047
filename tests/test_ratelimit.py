"""The shared token bucket (dicomflow/ratelimit.py) against a real redis-server: the rate holds
across processes, changes at run time, and a waiter gives up after its bounded wait."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import redis

from dicomflow.ratelimit import (
    BucketKeys,
    RateLimitError,
    RateLimitTimeout,
    TokenBucket,
    check_rate,
    current_rate,
    override,
    set_rate,
)


def _take_for(redis_url: str, name: str, rate: float, seconds: float, ready, go, out) -> None:
    """Once released, take tokens as fast as the bucket allows for `seconds`; put how many."""
    bucket = TokenBucket(redis.Redis.from_url(redis_url), BucketKeys.named(name), rate)
    ready.put(1)
    go.wait()
    end = time.monotonic() + seconds
    taken = 0
    while time.monotonic() < end:
        pause = bucket.try_acquire()
        if pause == 0:
            taken += 1
        else:
            time.sleep(min(pause, max(0.0, end - time.monotonic())))
    out.put(taken)


def test_the_rate_holds_across_processes(redis_url, connection):
    rate, seconds = 20.0, 1.5
    spawn = multiprocessing.get_context("spawn")
    ready, go, out = spawn.Queue(), spawn.Event(), spawn.Queue()
    procs = [spawn.Process(target=_take_for, args=(redis_url, "dest-a", rate, seconds, ready, go, out))
             for _ in range(3)]
    for proc in procs:
        proc.start()
    for _ in procs:                                   # all three imported and connected
        ready.get(timeout=60)
    go.set()
    counts = [out.get(timeout=30) for _ in procs]
    for proc in procs:
        proc.join(10)
    # Three processes together took what one bucket gives in the same window: rate x time plus
    # one burst (a rested bucket holds rate x 1 s), not three times that.
    total = sum(counts)
    assert rate * seconds * 0.9 <= total <= rate * seconds + rate * 1.0 + 1, counts
    assert all(c > 0 for c in counts), counts


def test_a_rested_bucket_gives_one_burst_then_the_rate(connection):
    bucket = TokenBucket(connection, BucketKeys.named("burst"), rate=4, burst=1.0)
    assert [bucket.try_acquire() for _ in range(4)] == [0.0] * 4    # one burst: rate x 1 s
    pause = bucket.try_acquire()
    assert 0 < pause <= 0.25                                        # then one token per 1/rate
    start = time.monotonic()
    waited = bucket.acquire(max_wait=5)
    assert 0.0 < waited <= 0.6 and time.monotonic() - start < 0.7


def test_the_rate_changes_at_run_time_and_default_removes_the_override(connection):
    keys = BucketKeys.named("research-pacs")
    slow = TokenBucket(connection, keys, rate=1)          # configured: 1/s, capacity 1
    assert slow.try_acquire() == 0.0
    assert slow.try_acquire() > 0.5
    set_rate(connection, keys, 200)                        # another process (the CLI, the API) sets it
    assert override(connection, keys) == 200.0 and slow.rate() == 200.0
    time.sleep(0.1)
    taken = sum(1 for _ in range(15) if slow.try_acquire() == 0.0)
    assert taken >= 10                                     # the running bucket follows at its next token
    set_rate(connection, keys, None)                       # `default`
    assert override(connection, keys) is None
    assert current_rate(connection, keys, 1.0) == 1.0 and slow.rate() == 1.0


def test_zero_is_no_limit(connection):
    bucket = TokenBucket(connection, BucketKeys.named("open"), rate=0)
    assert all(bucket.try_acquire() == 0.0 for _ in range(500))
    assert connection.exists(BucketKeys.named("open").bucket) == 0


def test_a_waiter_gives_up_after_its_bounded_wait_without_sleeping_it_out(connection):
    keys = BucketKeys.named("slow-dest")
    bucket = TokenBucket(connection, keys, rate=0.2)     # one token per 5 s
    assert bucket.acquire(max_wait=1) < 0.5
    start = time.monotonic()
    with pytest.raises(RateLimitTimeout) as caught:
        bucket.acquire(max_wait=1)
    assert time.monotonic() - start < 0.9                  # it knew the next token was 5 s away: no sleep
    assert caught.value.name == "slow-dest" and caught.value.rate == 0.2
    assert "slow-dest" in str(caught.value) and "0.2/s" in str(caught.value)
    # the give-up took no token: raised to 50/s, the next one comes at once
    set_rate(connection, keys, 50)
    time.sleep(0.05)
    assert bucket.acquire(max_wait=1) < 0.5


def test_an_idle_bucket_expires(connection):
    keys = BucketKeys.named("idle")
    TokenBucket(connection, keys, rate=100).try_acquire()
    ttl = connection.pttl(keys.bucket)
    assert 1000 < ttl <= 2000                               # refilled after 1 s, + 1 s


@pytest.mark.parametrize("name", ["", "a b", "../x", "a:b", "x" * 64, "-lead"])
def test_bad_names_are_refused(name):
    with pytest.raises(RateLimitError):
        BucketKeys.named(name)


@pytest.mark.parametrize("rate", [-1, float("nan"), float("inf"), "fast", None])
def test_bad_rates_are_refused(rate, connection):
    with pytest.raises(RateLimitError):
        check_rate(rate)
    with pytest.raises(RateLimitError):
        set_rate(connection, BucketKeys.named("x"), rate if rate is not None else -1)
    assert connection.get(BucketKeys.named("x").rate) is None
