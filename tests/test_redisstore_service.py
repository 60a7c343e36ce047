"""The redisstore service: its worker on its own, and end to end through Orthanc and the pipeline."""

from __future__ import annotations

import importlib
import sys

import pydicom
import pytest
import redis

from dicomflow.errors import ConfigError
from dicomflow.redisstore import QueueDatabaseError, RedisStore, StoreFullError
from dicomflow.redisstore.model import read_header
from scheduler.registry import load_registry
from tests.conftest import REPO
from tests.support.procs import wait_for
from tests.support.stack import Pipeline, diagnostics
from tests.test_redisstore import start_redis


@pytest.fixture()
def service_worker():
    sys.path.insert(0, str(REPO / "services" / "modules"))
    try:
        module = importlib.import_module("redisstore")
        module._stores.clear()
        yield module.worker
    finally:
        sys.path.remove(str(REPO / "services" / "modules"))
        sys.modules.pop("redisstore", None)


def _call(worker, path, config, connection):
    header = read_header(str(path))
    event = {"level": "instance", "orthanc": {"instance": "abc-123"}, "transferSyntax": header.transfer_syntax}
    return worker(jobName="redisstore", headers=header.tags, params={}, added_params={}, dcmpath=str(path),
                  event=event, config=config, connection=connection)


def test_builtin_redisstore_is_off_until_configured():
    registry, importer = load_registry(REPO / "services" / "registry", ("high", "default", "low"), {})
    importer.retire()
    assert registry.errors == [], [str(p) for p in registry.errors]
    assert registry.inactive["redisstore"] == "waiting for configuration: REDIS_STORE_URL"
    registry, importer = load_registry(REPO / "services" / "registry", ("high", "default", "low"),
                                       {"REDIS_STORE_URL": "redis://127.0.0.1:1/0"})
    importer.retire()
    assert "redisstore" in registry.jobs


def test_worker_stores_and_refuses_the_queue_database(service_worker, store_url, redis_url, connection, sag_anon):
    path = sorted(sag_anon.glob("*.dcm"))[0]
    redis.Redis.from_url(store_url).flushall()
    result = _call(service_worker, path, {"REDIS_STORE_URL": store_url}, connection)
    assert result["status"] == "stored"
    store = RedisStore(redis.Redis.from_url(store_url))
    got = store.get(file_name=f"{result['sop']}.dcm")
    assert got.data == path.read_bytes() and got.doc["orthanc_instance"] == "abc-123"
    assert _call(service_worker, path, {"REDIS_STORE_URL": store_url}, connection)["status"] == "unchanged"
    with pytest.raises(QueueDatabaseError, match="job queue's own Redis database"):
        _call(service_worker, path, {"REDIS_STORE_URL": redis_url}, connection)
    allowed = {"REDIS_STORE_URL": redis_url, "REDIS_STORE_ALLOW_QUEUE_DB": "1", "REDIS_STORE_PREFIX": "dicomtest:"}
    assert _call(service_worker, path, allowed, connection)["status"] == "stored"
    with pytest.raises(ConfigError, match="REDIS_STORE_URL"):
        _call(service_worker, path, {"REDIS_STORE_URL": "http://nope"}, connection)


def test_worker_out_of_memory_raises_for_a_retry(service_worker, tmp_path, connection, sag_anon):
    proc, url = start_redis(tmp_path / "full", "--maxmemory-policy", "noeviction")
    try:
        client = redis.Redis.from_url(url)
        client.set("ballast", b"x" * (4 << 20))
        client.config_set("maxmemory", "2mb")  # the store is now full
        path = sorted(sag_anon.glob("*.dcm"))[0]
        with pytest.raises(StoreFullError, match="out of memory"):
            _call(service_worker, path, {"REDIS_STORE_URL": url}, connection)
        assert list(client.scan_iter("dicom:*")) == []
        client.config_set("maxmemory", "0")  # room again: the retried job succeeds
        assert _call(service_worker, path, {"REDIS_STORE_URL": url}, connection)["status"] == "stored"
    finally:
        proc.terminate()
        proc.wait(10)


def test_sag_anon_is_stored_through_the_pipeline(tmp_path, redis_url, connection, store_url, sag_anon,
                                                 sag_anon_count):
    client = redis.Redis.from_url(store_url)
    client.flushall()
    config = tmp_path / "dicomflow.env"
    config.write_text(f"REDIS_STORE_URL={store_url}\nREDIS_STORE_CHUNK_KB=64\n")
    store = RedisStore(client)
    with Pipeline(tmp_path / "stack", redis_url, REPO / "services",
                  extra_config={"DICOMFLOW_CONFIG": str(config)}) as stack:
        stack.orthanc.store([sag_anon], aet="STORESCU", pattern="*.dcm")
        try:
            wait_for(lambda: store.stats()["instances"] == sag_anon_count, timeout=120,
                     what=f"{sag_anon_count} stored instances")
        except TimeoutError as exc:
            raise AssertionError(diagnostics(stack)) from exc
    for source in sag_anon.glob("*.dcm"):
        original = pydicom.dcmread(source)
        got = store.get(str(original.SOPInstanceUID))
        assert got.doc["chunk_size"] == str(64 * 1024) and got.doc["orthanc_instance"]
        # Orthanc rewrites the file meta group; the data set arrives unchanged
        assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(got.data)) == original
    assert store.count("SeriesInstanceUID") == {str(original.SeriesInstanceUID): sag_anon_count}
