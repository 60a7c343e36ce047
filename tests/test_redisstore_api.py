"""The scheduler's redisstore endpoints: the demo's three scenarios through the API."""

from __future__ import annotations

import base64
from collections import Counter

import pydicom
import pytest
import redis

from dicomflow.redisstore import RedisStore
from tests.test_redisstore import start_redis

AUTH = {"Authorization": "Bearer test-token"}


@pytest.fixture(scope="module")
def store_url(tmp_path_factory):
    proc, url = start_redis(tmp_path_factory.mktemp("store-redis"))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def loaded(store_url, sag_anon):
    client = redis.Redis.from_url(store_url)
    client.flushall()
    store = RedisStore(client)
    files = sorted(sag_anon.glob("*.dcm"))
    for path in files:
        store.store_file(str(path))
    return files, [pydicom.dcmread(p, stop_before_pixels=True) for p in files]


def test_the_three_scenarios(make_client, store_url, loaded, sag_anon):
    files, datasets = loaded
    client = make_client(REDIS_STORE_URL=store_url)
    # 1. a file by name
    response = client.get(f"/api/v1/redisstore/files/{files[5].name}", headers=AUTH)
    assert response.status_code == 200 and response.mimetype == "application/dicom"
    assert response.data == files[5].read_bytes()
    # 2. ProtocolName X and StudyDate in a year, with bytes
    protocol, year = str(datasets[0].ProtocolName), str(datasets[0].StudyDate)[:4]
    body = client.get("/api/v1/redisstore/find", query_string={"ProtocolName": protocol, "StudyDate": year,
                                                               "with_bytes": 1}, headers=AUTH).get_json()
    assert body["total"] == sum(1 for d in datasets if str(d.ProtocolName) == protocol)
    assert all(base64.b64decode(i["data"]) == (sag_anon / i["file_name"]).read_bytes() for i in body["instances"])
    none = client.get("/api/v1/redisstore/find", query_string={"ProtocolName": protocol, "StudyDate": "1999"},
                      headers=AUTH).get_json()
    assert none == {"total": 0, "instances": []}
    # 3. counts per protocol
    counts = client.get("/api/v1/redisstore/count?by=ProtocolName", headers=AUTH).get_json()
    assert counts["counts"] == dict(Counter(str(d.ProtocolName) for d in datasets))
    # the rest
    sop = str(datasets[0].SOPInstanceUID)
    assert client.get(f"/api/v1/redisstore/instances/{sop}?metadata=1", headers=AUTH).get_json()["PatientID"] \
        == str(datasets[0].PatientID)
    assert client.get("/api/v1/redisstore/stats", headers=AUTH).get_json()["instances"] == len(files)
    assert client.get("/api/v1/redisstore/files/nothing.dcm", headers=AUTH).status_code == 404
    assert client.get("/api/v1/redisstore/find?Rows=1", headers=AUTH).status_code == 400
    assert client.get("/api/v1/redisstore/find?StudyDate=13", headers=AUTH).status_code == 400
    assert client.get("/api/v1/redisstore/count", headers=AUTH).status_code == 400
    assert client.get("/api/v1/redisstore/stats").status_code == 401


def test_off_until_configured_and_never_on_the_queue(make_client, redis_url):
    assert make_client().get("/api/v1/redisstore/stats", headers=AUTH).get_json()["error"] == "not-configured"
    response = make_client(REDIS_STORE_URL=redis_url).get("/api/v1/redisstore/stats", headers=AUTH)
    assert response.status_code == 503 and "job queue's own Redis database" in response.get_json()["message"]
