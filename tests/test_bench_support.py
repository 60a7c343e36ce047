"""The ingest benchmark's parts: its pipeline runs Redis as run.sh does, so (c) pays for
its disk writes; its counting sink takes batches as the scheduler would."""

import json
import os
import sys
import time
from pathlib import Path

import redis
import requests

from bench.sink import CountingSink
from bench.support import private_redis

REPO = Path(__file__).resolve().parent.parent


def test_the_benchmarks_redis_keeps_an_append_only_file_like_run_sh():
    with private_redis(aof=True) as url:
        client = redis.Redis.from_url(url, decode_responses=True)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("save") == {"save": ""}
        client.set("k", "v")
        assert client.info("persistence")["aof_enabled"] == 1


def test_without_aof_it_keeps_nothing_on_disk():
    with private_redis(aof=False) as url:
        client = redis.Redis.from_url(url, decode_responses=True)
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.info("persistence")["aof_enabled"] == 0


def test_the_counting_sink_counts_the_plugins_batches_as_the_scheduler_would_take_them():
    """(c-sink)'s receiver: a process of its own that counts instance events and their
    latency without parsing JSON, and refuses a wrong token as the scheduler does."""
    sys.path.insert(0, str(REPO / "orthanc"))
    from dicomflow_delivery import batch_body

    now = time.time()
    events = [json.dumps({"level": "instance", "headers": {"SOPInstanceUID": f"1.2.{n}"},
                          "receivedAt": now - 0.25}, separators=(",", ":")) for n in range(3)]
    sink = CountingSink("right", prefix=["nice", "-n", "10"]).start()
    try:
        assert os.getpriority(os.PRIO_PROCESS, sink._proc.pid) >= 10
        url = sink.url + "/api/v1/events"
        refused = requests.post(url, data=batch_body(events), headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 401
        for body in (batch_body(events[:2]), batch_body(events[2:])):
            taken = requests.post(url, data=body, headers={"Authorization": "Bearer right"})
            assert taken.status_code == 200
        latencies = sink.wait_for_events(3, timeout=10)
        assert len(latencies) == 3 and all(0.25 <= t < 5 for t in latencies)
        assert sink.stats()["batches"] == 2  # the refused batch is not counted
        assert sink.wait_for_events(0, timeout=1) == []
        assert sink.cpu()["sink"] > 0
    finally:
        sink.stop()
