"""The ingest benchmark's pipeline runs Redis as run.sh does, so (c) pays for its disk writes."""

import redis

from bench.support import private_redis


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
