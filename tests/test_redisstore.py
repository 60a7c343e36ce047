"""The Redis DICOM store (dicomflow.redisstore) against a real redis-server of its own."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pydicom
import pydicom.data
import pytest
import redis

from dicomflow.redisstore import (InvalidInputError, NotFoundError, QueueDatabaseError, RedisStore, RedisStoreError,
                                  StoreFullError)
from dicomflow.redisstore.errors import IntegrityError
from dicomflow.redisstore.fetch import fetch
from dicomflow.redisstore.model import read_header
from dicomflow.redisstore.query import parse_date_range
from dicomflow.redisstore.store import PENDING_TTL
from tests.support.redis_server import start_redis_server


def start_redis(folder: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """A redis-server for the store (not the queue's), on a free port."""
    return start_redis_server(folder, *extra, what="the store's redis-server")


@pytest.fixture()
def store(store_url) -> RedisStore:
    client = redis.Redis.from_url(store_url)
    client.flushall()
    return RedisStore(client, "dicom:", 64 * 1024)


def pydicom_files() -> list[str]:
    return sorted(p for p in pydicom.data.get_testdata_files() if os.path.isfile(p))


def _persistent_keys(client: redis.Redis) -> list[bytes]:
    return [k for k in client.scan_iter("dicom:*") if client.ttl(k) == -1]


def test_sag_anon_round_trip_byte_identical(store, sag_anon):
    files = sorted(sag_anon.glob("*.dcm"))
    for path in files:
        assert store.store_file(str(path)).status == "stored"
    assert store.stats()["instances"] == len(files)
    for path in files:
        got = store.get(file_name=path.name)
        assert got.data == path.read_bytes()
        assert got.doc["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # a second store of the same files changes nothing
    assert {store.store_file(str(p)).status for p in files} == {"unchanged"}


def test_every_pydicom_test_file_round_trips_or_is_refused_clearly(store):
    stored, refused = 0, 0
    by_sop: dict[str, bytes] = {}
    for path in pydicom_files():
        try:
            result = store.store_file(path)
        except InvalidInputError as exc:
            assert os.path.basename(path) in str(exc)
            assert not _has_sop_instance_uid(path), path  # only what cannot be keyed is refused
            refused += 1
            continue
        stored += 1
        by_sop[result.sop] = Path(path).read_bytes()  # several test files share a SOPInstanceUID: the last wins
    assert stored >= 150, (stored, refused)  # refused: text, JSON, ICC, gzip, DICOMDIRs, no SOPInstanceUID
    for sop, data in by_sop.items():
        assert store.get(sop).data == data
    assert store.stats()["instances"] == len(by_sop)


def _has_sop_instance_uid(path: str) -> bool:
    try:
        return "SOPInstanceUID" in pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - not DICOM at all
        return False


def _expected(files: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in files]


def test_find_and_count_match_an_independent_reading(store, sag_anon):
    files = sorted(sag_anon.glob("*.dcm"))
    for path in files:
        store.store_file(str(path))
    datasets = _expected(files)
    protocol = str(datasets[0].ProtocolName)
    year = str(datasets[0].StudyDate)[:4]
    want = sorted(str(d.SOPInstanceUID) for d in datasets
                  if str(d.ProtocolName) == protocol and str(d.StudyDate).startswith(year))
    total, found = store.find({"ProtocolName": protocol}, {"StudyDate": parse_date_range(year)}, with_bytes=True)
    assert total == len(want) and [f.sop for f in found] == want
    assert all(f.data == (sag_anon / f.file_name).read_bytes() for f in found)
    total, _ = store.find({"ProtocolName": protocol}, {"StudyDate": parse_date_range(f"{int(year) + 1}")})
    assert total == 0
    total, found = store.find({"PatientID": str(datasets[0].PatientID)}, limit=5, documents=False)
    assert total == len(files) and len(found) == 5
    assert store.count("ProtocolName") == dict(Counter(str(d.ProtocolName) for d in datasets))
    assert store.count("SeriesInstanceUID", {"Modality": "MR"}) == dict(
        Counter(str(d.SeriesInstanceUID) for d in datasets if d.Modality == "MR"))
    with pytest.raises(ValueError, match="not indexed"):
        store.find({"Rows": "256"})


def _sample(sag_anon) -> Path:
    return sorted(sag_anon.glob("*.dcm"))[0]


def test_replace_moves_the_indexes_and_delete_leaves_nothing(store, sag_anon):
    path = _sample(sag_anon)
    header = read_header(str(path))
    data = path.read_bytes()
    sop = store.store_file(str(path)).sop
    tags = dict(header.tags, ProtocolName="other protocol", StudyDate="19991231")
    assert store.store_bytes(data + b"\0\0", tags, file_name=path.name).status == "replaced"
    assert store.find({"ProtocolName": str(header.tags["ProtocolName"])})[0] == 0
    assert store.find({"ProtocolName": "other protocol"}, {"StudyDate": (19990101, 19991231)})[0] == 1
    assert store.count("ProtocolName") == {"other protocol": 1}
    assert store.get(sop).data == data + b"\0\0"
    assert store.stats()["bytes"] == len(data) + 2
    assert store.delete(sop) is True
    assert store.delete(sop) is False
    # the old version's chunks expire after the grace period; nothing else is left
    assert _persistent_keys(store.client) == []
    assert store.stats()["bytes"] == 0
    with pytest.raises(NotFoundError):
        store.get(sop)


def test_awkward_tag_values_are_indexed_verbatim(store, sag_anon):
    path = _sample(sag_anon)
    tags = dict(read_header(str(path)).tags)
    for n, value in enumerate(["a*b", "x:y:z", "with spaces", "Müller^Jürgen 李", ""]):
        tags.update(SOPInstanceUID=f"1.2.3.{n}", PatientID=value)
        store.store_bytes(path.read_bytes(), tags, file_name=f"f{n}.dcm")
        total, found = store.find({"PatientID": value})
        assert total == 1 and found[0].sop == f"1.2.3.{n}", value
    assert store.count("PatientID")["Müller^Jürgen 李"] == 1
    total, _ = store.find({"PatientID": "*"})
    assert total == 0  # no pattern matching: '*' is a value like any other


def test_bad_input_is_refused_with_a_clear_message(store, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM at all\n" * 20)
    with pytest.raises(InvalidInputError, match="notes.txt: not a readable DICOM file"):
        store.store_file(str(text))
    with pytest.raises(InvalidInputError, match="no SOPInstanceUID"):
        store.store_bytes(b"x", {"PatientID": "p"}, file_name="x.dcm")
    with pytest.raises(InvalidInputError, match="cannot read"):
        store.store_file(str(tmp_path / "missing.dcm"))
    assert _persistent_keys(store.client) == []


def test_a_writer_that_dies_before_the_switch_leaves_nothing_visible(store, sag_anon):
    path = _sample(sag_anon)
    header = read_header(str(path))
    sop = str(header.tags["SOPInstanceUID"])
    store._write_chunks(sop, "deadbeef", [b"x" * 10, b"y"])  # chunks written, then the writer "dies"
    with pytest.raises(NotFoundError):
        store.get(sop)
    assert store.find({"PatientID": str(header.tags["PatientID"])})[0] == 0
    assert 0 < store.client.ttl(f"dicom:chunk:{sop}:deadbeef:0") <= PENDING_TTL
    assert store.store_file(str(path)).status == "stored"
    assert store.get(sop).data == path.read_bytes()


def test_two_concurrent_writers_end_with_one_consistent_copy(store, sag_anon):
    path = _sample(sag_anon)
    header = read_header(str(path))
    base = path.read_bytes()
    errors = []

    def write(tag: str) -> None:
        try:
            for n in range(30):
                store.store_bytes(base + tag.encode() * (n + 1) * 5000, dict(header.tags, ProtocolName=tag),
                                  file_name=path.name)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
    threads = [threading.Thread(target=write, args=(t,)) for t in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = store.get(str(header.tags["SOPInstanceUID"]))  # verifies size and SHA-256
    assert store.stats()["instances"] == 1
    counts = store.count("ProtocolName")
    assert counts == {got.doc["ProtocolName"]: 1}
    persistent_chunks = [k for k in _persistent_keys(store.client) if b":chunk:" in k]
    assert len(persistent_chunks) == int(got.doc["chunks"])


def test_out_of_memory_fails_clearly_and_stores_nothing(tmp_path, sag_anon):
    proc, url = start_redis(tmp_path / "small", "--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    try:
        client = redis.Redis.from_url(url)
        store = RedisStore(client, "dicom:", 64 * 1024)
        big = tmp_path / "big.dcm"
        path = _sample(sag_anon)
        big.write_bytes(path.read_bytes() + b"\0" * (8 << 20))
        with pytest.raises(StoreFullError, match="out of memory"):
            store.store_file(str(big))
        assert store.stats()["instances"] == 0
        assert _persistent_keys(client) == []
        assert list(client.scan_iter("dicom:chunk:*")) == []
        assert store.store_file(str(path)).status == "stored"  # a small one still fits
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_queue_database_is_refused(store, store_url, redis_url):
    store.check_not_queue(redis.Redis.from_url(redis_url))
    with pytest.raises(QueueDatabaseError, match="REDIS_STORE_ALLOW_QUEUE_DB"):
        store.check_not_queue(redis.Redis.from_url(store_url.replace("127.0.0.1", "localhost")))
    store.check_not_queue(redis.Redis.from_url(store_url[:-1] + "1"))  # another database of it is allowed


def test_a_large_file_comes_back_in_parallel_byte_identical(store, store_url, tmp_path, sag_anon):
    big = tmp_path / "big.dcm"
    with open(big, "wb") as out:
        out.write(_sample(sag_anon).read_bytes())
        out.write(os.urandom(20 << 20) + b"tail")
    sop = store.store_file(str(big)).sop
    for raw in (True, False):  # our RESP sockets, and redis-py's asyncio client (TLS, unix sockets)
        result = fetch(store_url, sop, str(tmp_path / "back.dcm"), connections=8, raw=raw)
        assert result.verified and (tmp_path / "back.dcm").read_bytes() == big.read_bytes()
        os.unlink(tmp_path / "back.dcm")
    with pytest.raises(NotFoundError):
        fetch(store_url, "1.2.3.nothing", str(tmp_path / "none.dcm"))
    assert not (tmp_path / "none.dcm").exists()


def test_date_ranges():
    assert parse_date_range("2013") == (20130000, 20131231)
    assert parse_date_range("201303-20130510") == (20130300, 20130510)
    assert parse_date_range("-2000") == (0, 20001231)
    with pytest.raises(ValueError):
        parse_date_range("13")


def test_the_parallel_reader_logs_in_and_selects_the_database(tmp_path, sag_anon):
    proc, url = start_redis(tmp_path / "auth")
    try:
        redis.Redis.from_url(url).config_set("requirepass", "s3cret:/@x")
        url = url.replace("redis://", "redis://:s3cret%3A%2F%40x@")[:-1] + "3"
        store = RedisStore(redis.Redis.from_url(url), "dicom:", 64 * 1024)
        big = tmp_path / "big.dcm"
        big.write_bytes(_sample(sag_anon).read_bytes() + os.urandom(1 << 20))
        sop = store.store_file(str(big)).sop
        assert fetch(url, sop, str(tmp_path / "back.dcm")).verified
        assert (tmp_path / "back.dcm").read_bytes() == big.read_bytes()
        assert store.get(sop).data == big.read_bytes()  # the chunk reader logs in and selects 3 too
    finally:
        proc.terminate()
        proc.wait(10)


def test_chunk_reads_stay_in_step_when_a_version_is_gone(store, sag_anon):
    """Chunks are received straight into one buffer per read (resp.BulkConnection): a version deleted
    between the search and the MGET (a nil among the values) leaves that instance unread, the others
    byte-identical, and the connection in step for the next read."""
    files = {p.name: p.read_bytes() for p in sorted(sag_anon.glob("*.dcm"))[:3]}
    for name in files:
        store.store_file(str(sag_anon / name))
    _, found = store.find({"Modality": "MR"})
    assert len(found) == 3 and all(int(f.doc["chunks"]) == 4 for f in found)  # 232 KB in 64 KiB chunks
    gone = found[1]
    store.client.unlink(*(store.keys.chunk(gone.sop, gone.doc["version"], n) for n in range(4)))
    assert store._read_bytes(found) is False
    assert gone.data is None
    assert [found[0].data, found[2].data] == [files[found[0].file_name], files[found[2].file_name]]
    assert store.get(found[2].sop).data == files[found[2].file_name]
    with pytest.raises(RedisStoreError, match="replaced faster than it could be read"):
        store.get(gone.sop)


def test_chunks_are_read_over_a_unix_socket(tmp_path, sag_anon):
    socket_path = tmp_path / "redis.sock"
    proc, _ = start_redis(tmp_path / "unix", "--unixsocket", str(socket_path))
    try:
        store = RedisStore(redis.Redis(unix_socket_path=str(socket_path), db=2), "dicom:", 64 * 1024)
        assert store._bulk is not None
        path = _sample(sag_anon)
        sop = store.store_file(str(path)).sop
        assert store.get(sop).data == path.read_bytes()
        assert store.find({"file_name": path.name}, with_bytes=True)[1][0].data == path.read_bytes()
        store.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_search_with_bytes_verifies_each_file(store, sag_anon):
    """Scenario 2 checks each file's SHA-256: a chunk altered in Redis (same size) is caught."""
    for path in sorted(sag_anon.glob("*.dcm"))[:3]:
        store.store_file(str(path))
    _, found = store.find({"Modality": "MR"})
    bad = found[1]
    key = store.keys.chunk(bad.sop, bad.doc["version"], 2)
    value = bytearray(store.client.get(key))
    value[100] ^= 0xFF
    store.client.set(key, bytes(value))
    with pytest.raises(IntegrityError, match=f"{bad.sop}: the bytes read back .* do not match the stored"):
        store.find({"Modality": "MR"}, with_bytes=True)
    total, unverified = store.find({"Modality": "MR"}, with_bytes=True, verify=False)
    assert total == 3 and unverified[1].data[2 * 64 * 1024 + 100] == value[100]
    with pytest.raises(IntegrityError):
        store.get(bad.sop)
