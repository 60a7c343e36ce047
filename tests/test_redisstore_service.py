"""The redisstore service: its worker on its own, and end to end through Orthanc and the pipeline."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys

import msgpack
import pydicom
import pytest
import redis
from rq.job import Job

from dicomflow.errors import ConfigError
from dicomflow.redisstore import FileEntry, InvalidInputError, QueueDatabaseError, RedisStore, StoreFullError
from dicomflow.redisstore.model import read_header
from scheduler.registry import load_registry
from tests.conftest import REPO
from tests.support.procs import wait_for
from tests.support.services import AUTH
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


def test_a_batched_job_stores_its_instances_through_real_workers(tmp_path, redis_url, connection, store_url,
                                                                 make_client, sag_anon):
    """settings.json's batchSize: one delivery of 40 instances of a series is 3 jobs (16 + 16 + 8), run
    by real RQ worker processes; every instance arrives byte for byte, and a re-run changes nothing."""
    services = tmp_path / "services"
    for part in ("registry", "modules"):
        shutil.copytree(REPO / "services" / part / "redisstore", services / part / "redisstore")
    store = RedisStore(redis.Redis.from_url(store_url))
    store.client.flushall()
    cache = tmp_path / "home" / "cache" / "instances"  # the workers' DICOMFLOW_HOME: no Orthanc to fetch from
    cache.mkdir(parents=True)
    files = sorted(sag_anon.glob("*.dcm"))[:40]
    events = []
    for n, path in enumerate(files):
        header = read_header(str(path))
        orthanc_id = "-".join(f"{n:08x}" for _ in range(5))
        shutil.copyfile(path, cache / f"{orthanc_id}.dcm")
        events.append({"level": "instance", "headers": header.tags, "remoteAet": "STORESCU",
                       "orthanc": {"instance": orthanc_id}, "transferSyntax": header.transfer_syntax})
    client = make_client(REDIS_STORE_URL=store_url)
    env = {**os.environ, "DICOMFLOW_REDIS_URL": redis_url, "DICOMFLOW_SERVICES_DIR": str(services),
           "DICOMFLOW_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO), "REDIS_STORE_URL": store_url}

    def deliver_and_work() -> set[str]:
        response = client.post("/api/v1/events", json={"events": events}, headers=AUTH)
        assert response.status_code == 200, response.get_data(as_text=True)
        jobs = {r["jobs"]["redisstore"] for r in response.get_json()["results"]}
        workers = [subprocess.Popen([sys.executable, "-m", "worker.cli", "--burst"], env=env, cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
        outputs = [w.communicate(timeout=120)[0].decode() for w in workers]
        assert all(w.returncode == 0 for w in workers), outputs
        return jobs
    jobs = deliver_and_work()
    results = [Job.fetch(j, connection=connection).return_value() for j in sorted(jobs)]
    assert sorted(r["instances"] for r in results) == [8, 16, 16]
    assert {s for r in results for s in r["results"].values()} == {"stored"}
    assert store.stats()["instances"] == len(files)
    for path in files:
        sop = str(read_header(str(path)).tags["SOPInstanceUID"])
        got = store.get(file_name=f"{sop}.dcm")
        assert got.data == path.read_bytes() and got.doc["orthanc_instance"]
    connection.delete(*connection.keys("dicomflow:run:*"))  # the same delivery again is not a duplicate
    again = deliver_and_work()
    assert again and again.isdisjoint(jobs)
    assert {s for j in again for s in Job.fetch(j, connection=connection).return_value()["results"].values()} == {
        "unchanged"}


def test_a_batch_is_switched_whole_or_not_at_all(tmp_path, store_url, sag_anon):
    """The batch's script checks every instance's chunks before its first write: one missing, none switched."""
    store = RedisStore(redis.Redis.from_url(store_url), "dicom:", 64 * 1024)
    store.client.flushall()
    first, second = sorted(sag_anon.glob("*.dcm"))[:2]
    docs = [store._document(p.read_bytes(), read_header(str(p)).tags, p.name, "", None) for p in (first, second)]
    data = first.read_bytes()
    for index, start in enumerate(range(0, len(data), 64 * 1024)):  # the first one's chunks only
        store.client.set(store.keys.chunk(docs[0]["SOPInstanceUID"], docs[0]["version"], index),
                         data[start:start + 64 * 1024], ex=60)
    args = [store.keys.prefix, store._eq, store._ranges, 60]
    for doc in docs:
        args += [doc["SOPInstanceUID"], msgpack.packb([x for pair in doc.items() for x in pair])]
    with pytest.raises(redis.ResponseError, match="STALE chunk 0 of version .* of " + docs[1]["SOPInstanceUID"]):
        store._store_many(args=args)
    assert store.stats()["instances"] == 0 and list(store.client.scan_iter("dicom:doc:*")) == []


def test_a_batch_stores_the_good_files_and_names_the_bad_one(tmp_path, store_url, sag_anon):
    store = RedisStore(redis.Redis.from_url(store_url))
    store.client.flushall()
    good = sorted(sag_anon.glob("*.dcm"))[:3]
    bad = tmp_path / "notes.txt"
    bad.write_text("not DICOM\n" * 30)
    with pytest.raises(InvalidInputError, match=r"1 of 4 files not stored \(3 were\): .*notes.txt"):
        store.store_files([FileEntry(str(good[0])), FileEntry(str(bad)), FileEntry(str(good[1])),
                           FileEntry(str(good[2]))])
    assert store.stats()["instances"] == 3
    assert [r.status for r in store.store_files([FileEntry(str(p)) for p in good])] == ["unchanged"] * 3


def test_an_out_of_memory_batch_stores_nothing(tmp_path, sag_anon):
    proc, url = start_redis(tmp_path / "full", "--maxmemory-policy", "noeviction")
    try:
        client = redis.Redis.from_url(url)
        client.set("ballast", b"x" * (4 << 20))
        client.config_set("maxmemory", "5mb")  # room for a few chunks, not for the batch
        store = RedisStore(client)
        files = [FileEntry(str(p)) for p in sorted(sag_anon.glob("*.dcm"))[:16]]
        with pytest.raises(StoreFullError, match="16 instances: .*out of memory.*nothing was stored"):
            store.store_files(files)
        assert list(client.scan_iter("dicom:*")) == []
        client.config_set("maxmemory", "0")
        assert {r.status for r in store.store_files(files)} == {"stored"}
    finally:
        proc.terminate()
        proc.wait(10)
