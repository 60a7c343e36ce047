"""What the scheduler and the workers do with oversized, malformed or hostile input (issue 16)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from rq import Queue
from rq.job import Job

from dicomflow import keys
from dicomflow.errors import ConfigError, OrthancError
from scheduler.app import create_app
from scheduler.registry import MAX_SETTINGS_BYTES, load_registry
from tests.support.procs import free_port
from tests.support.redis_server import start_redis_server, stop_redis_server
from tests.support.services import AUTH, job, make_service, settings_for
from tests.support.services import instance_event as _event_without_ids
from worker.dicomcache import DicomCache


def orthanc_id(text: str) -> str:
    digest = hashlib.sha1(text.encode()).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def instance_event(sop: str, **headers) -> dict:
    event = _event_without_ids(sop, **headers)
    event["orthanc"] = {"instance": orthanc_id(sop)}
    return event


def post(client, body):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post("/api/v1/events", data=data, content_type="application/json", headers=AUTH)


def results(client, *events) -> list[dict]:
    response = post(client, {"events": list(events)})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


def nested(depth: int, leaf: object = "x") -> object:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


# The body size limit.

def test_a_body_over_the_limit_is_refused_with_a_json_413_and_nothing_is_enqueued(make_client, services, connection):
    make_service(services, "a", job("aJob", "a"))
    client = make_client(DICOMFLOW_SCHEDULER_MAX_BODY_MB="1")
    big = instance_event("1.1", Padding="x" * (1 << 20))
    response = post(client, {"events": [big]})
    assert response.status_code == 413
    assert response.get_json()["error"] == "too-large" and "1 MiB" in response.get_json()["message"]
    assert Queue("default", connection=connection).count == 0
    assert [r["status"] for r in results(client, instance_event("1.2"))] == ["scheduled"]


def test_the_body_limit_is_64_mib_unless_configured(make_client, tmp_path, redis_url, services, connection):
    assert make_client().application.config["MAX_CONTENT_LENGTH"] == 64 << 20
    assert make_client(DICOMFLOW_SCHEDULER_MAX_BODY_MB="200").application.config["MAX_CONTENT_LENGTH"] == 200 << 20
    for bad in ("0", "lots", "-5", "1.5"):
        with pytest.raises(ConfigError, match="DICOMFLOW_SCHEDULER_MAX_BODY_MB"):
            create_app(settings_for(tmp_path, redis_url, services, DICOMFLOW_SCHEDULER_MAX_BODY_MB=bad), connection)


# UIDs.

@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"])
@pytest.mark.parametrize("value", [12345, 1.5, True, ["1.2.3"], {"uid": "1.2.3"}])
def test_a_uid_that_is_not_a_string_makes_its_event_invalid(make_client, services, connection, keyword, value):
    make_service(services, "a", job("aJob", "a"))
    bad = instance_event("2.1")
    bad["headers"][keyword] = value
    first, second = results(make_client(), bad, instance_event("2.2"))
    assert first["status"] == "invalid"
    assert f"{keyword} must be a string" in first["errors"][0] and type(value).__name__ in first["errors"][0]
    assert second["status"] == "scheduled"
    assert connection.hget(keys.STATS, "events:invalid") == b"1"


@pytest.mark.parametrize("value, why", [("", "empty"), (" \x00", "empty"), ("1." * 100, "more than 128"),
                                        ("1.2\n3", "control characters")])
def test_an_empty_overlong_or_control_character_uid_is_invalid(make_client, services, value, why):
    make_service(services, "a", job("aJob", "a"))
    bad = instance_event("2.3", SeriesInstanceUID=value)
    (result,) = results(make_client(), bad)
    assert result["status"] == "invalid" and why in result["errors"][0], result


def test_non_conformant_uids_of_real_files_are_accepted_and_padding_is_stripped(make_client, services, connection):
    """Files in the wild carry UIDs longer than 64 characters, with leading zeros, even with
    letters (anonymisers); Orthanc stores them, so the scheduler schedules them."""
    make_service(services, "a", job("aJob", "a"))
    client = make_client()
    long_uid = "1.2.826.0.1.3680043.10.363.5421649119139350670558684743636101576.101"  # 67 characters
    padded = instance_event("2.4\x00", SeriesInstanceUID="1.2.03.4 ", StudyInstanceUID="2.25.ABCDEF")
    out = results(client, instance_event(long_uid), padded)
    assert [r["status"] for r in out] == ["scheduled", "scheduled"]
    headers = Job.fetch(out[1]["jobs"]["aJob"], connection=connection).kwargs["headers"]
    assert (headers["SOPInstanceUID"], headers["SeriesInstanceUID"]) == ("2.4", "1.2.03.4")
    # The same instance without the padding is the same event.
    assert results(client, instance_event("2.4"))[0]["status"] == "duplicate"


# Deep nesting.

@pytest.mark.parametrize("depth", [150, 5000, 100_000])
def test_a_deeply_nested_body_is_a_400_not_a_500(make_client, services, connection, depth):
    make_service(services, "a", job("aJob", "a"))
    event = instance_event("3.1")
    text = json.dumps({"events": [event]})
    # Nested inside a header, built as text: json.dumps itself fails on the deepest.
    text = text.replace('"PatientID": "P1"', '"PatientID": "P1", "Deep": ' + "[" * depth + "]" * depth)
    response = post(make_client(), text)
    assert response.status_code == 400, response.get_data()[:300]
    assert response.get_json()["error"] == "bad-request" and "deeper than 100" in response.get_json()["message"]
    assert Queue("default", connection=connection).count == 0


def test_nesting_as_dicom_sequences_have_it_is_fine(make_client, services):
    make_service(services, "a", job("aJob", "a"))
    (result,) = results(make_client(), instance_event("3.2", Deep=nested(60)))
    assert result["status"] == "scheduled"


# Orthanc instance ids.

@pytest.mark.parametrize("orthanc", [{}, {"instance": None}, {"instance": ""}, {"instance": "i"},
                                     {"instance": 42}, {"instance": ["x"]}, {"instance": "../../etc/passwd"},
                                     {"instance": orthanc_id("x").upper()}, {"instance": orthanc_id("x") + "0"}])
def test_an_instance_event_without_an_orthanc_id_is_invalid(make_client, services, connection, orthanc):
    make_service(services, "a", job("aJob", "a"))
    bad = {**instance_event("4.1"), "orthanc": orthanc}
    (result,) = results(make_client(), bad)
    assert result["status"] == "invalid" and "orthanc.instance" in result["errors"][0], result
    assert Queue("default", connection=connection).count == 0


def test_a_series_event_needs_no_instance_id(make_client, services):
    series = {"level": "series", "headers": {"SeriesInstanceUID": "4.2"}, "orthanc": {"series": orthanc_id("s")}}
    assert results(make_client(), series)[0]["status"] in ("nothing", "scheduled")


# The workers' cache: a clear OrthancError, never a TypeError or OSError.

class _FakeOrthanc(BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, bytes]] = {}
    #: The headers of each request, in order.
    seen: list[dict[str, str]] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        status, body = self.answers.get(self.path, (404, b'{"HttpError": "Not Found", "Message": "Unknown resource"}'))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_orthanc():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOrthanc)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _FakeOrthanc.answers
    server.shutdown()
    server.server_close()
    _FakeOrthanc.answers.clear()
    _FakeOrthanc.seen.clear()


def cache_for(tmp_path, redis_url, services, url: str) -> DicomCache:
    # No retries of an unavailable Orthanc here (tests/test_worker_transient.py has those).
    return DicomCache(settings_for(tmp_path, redis_url, services, ORTHANC_URL=url,
                                   DICOMFLOW_ORTHANC_RETRY_SECONDS="0"))


def leftovers(cache: DicomCache) -> list[str]:
    return sorted(p.name for p in cache.instances.iterdir() if not p.name.endswith(".lock"))


@pytest.mark.parametrize("bad", [None, 42, ["a"], "", "abc", "../etc/passwd", "x" * 5000, orthanc_id("x").upper(),
                                 orthanc_id("x") + "\x00"])
def test_a_bad_instance_id_is_an_orthanc_error_naming_it(tmp_path, redis_url, services, fake_orthanc, bad):
    cache = cache_for(tmp_path, redis_url, services, fake_orthanc[0])
    with pytest.raises(OrthancError, match="invalid Orthanc instance id") as caught:
        cache.instance(bad)
    assert repr(bad)[:40] in str(caught.value)
    with pytest.raises(OrthancError):
        cache.folder([orthanc_id("ok"), bad], "job-1")
    assert list(cache.jobs.iterdir()) == [] and leftovers(cache) == []


def test_a_list_of_ids_that_is_not_a_list_is_an_orthanc_error(tmp_path, redis_url, services, fake_orthanc):
    cache = cache_for(tmp_path, redis_url, services, fake_orthanc[0])
    for bad in (orthanc_id("a"), 7, {"a": 1}):
        with pytest.raises(OrthancError, match="list of Orthanc instance ids"):
            cache.folder(bad, "job-2")


def test_an_unknown_id_is_an_orthanc_error_saying_orthanc_has_none(tmp_path, redis_url, services, fake_orthanc):
    cache = cache_for(tmp_path, redis_url, services, fake_orthanc[0])
    unknown = orthanc_id("unknown")
    with pytest.raises(OrthancError, match=f"Orthanc has no instance {unknown}.*404.*Unknown resource"):
        cache.instance(unknown)
    assert leftovers(cache) == []


def test_an_orthanc_failure_is_an_orthanc_error_with_its_answer(tmp_path, redis_url, services, fake_orthanc):
    url, answers = fake_orthanc
    cache = cache_for(tmp_path, redis_url, services, url)
    broken = orthanc_id("broken")
    answers[f"/instances/{broken}/file"] = (500, b"database is locked")
    with pytest.raises(OrthancError, match=f"instance {broken}: GET .* answered 500: database is locked"):
        cache.instance(broken)
    assert leftovers(cache) == []
    good = orthanc_id("good")
    answers[f"/instances/{good}/file"] = (200, b"DICM" * 1000)
    assert cache.instance(good).read_bytes() == b"DICM" * 1000
    assert leftovers(cache) == [f"{good}.dcm"]
    # Asked for the file as it is: Orthanc gzips for a client that accepts gzip (its CPU, not ours).
    assert {h.get("accept-encoding") for h in _FakeOrthanc.seen} == {"identity"}


def test_the_cache_sends_orthancs_credentials(tmp_path, redis_url, services, fake_orthanc):
    url, answers = fake_orthanc
    cache = DicomCache(settings_for(tmp_path, redis_url, services, ORTHANC_URL=url, ORTHANC_USERNAME="worker",
                                    ORTHANC_PASSWORD="s3cr:et", DICOMFLOW_ORTHANC_RETRY_SECONDS="0"))
    good = orthanc_id("auth")
    answers[f"/instances/{good}/file"] = (200, b"DICM")
    cache.instance(good)
    assert _FakeOrthanc.seen[-1]["authorization"] == "Basic " + base64.b64encode(b"worker:s3cr:et").decode()


def test_an_unreachable_orthanc_is_an_orthanc_error(tmp_path, redis_url, services):
    cache = cache_for(tmp_path, redis_url, services, f"http://127.0.0.1:{free_port()}")
    some = orthanc_id("some")
    with pytest.raises(OrthancError, match=f"cannot fetch instance {some} from Orthanc"):
        cache.instance(some)
    assert leftovers(cache) == []


# settings.json size.

def test_an_oversized_settings_json_is_a_load_problem_naming_the_file(tmp_path):
    make_service(tmp_path, "good", job("goodJob", "good"))
    huge = job("hugeJob", "huge", params={"blob": "x" * MAX_SETTINGS_BYTES})
    make_service(tmp_path, "huge", huge)
    registry, _ = load_registry(tmp_path / "registry", ("high", "default", "low"), {})
    assert list(registry.jobs) == ["goodJob"]
    (problem,) = registry.errors
    assert problem.service == "huge" and problem.source.endswith("huge/settings.json")
    assert "larger than 1024 KiB" in problem.message
    # Just under the limit still loads.
    small = job("hugeJob", "huge", params={"blob": "x" * (MAX_SETTINGS_BYTES - 200)})
    make_service(tmp_path, "huge", small)
    registry, _ = load_registry(tmp_path / "registry", ("high", "default", "low"), {})
    assert sorted(registry.jobs) == ["goodJob", "hugeJob"] and registry.errors == []


# A full Redis (maxmemory, noeviction): 503, nothing written, the batch goes through later.

@pytest.fixture()
def small_redis(tmp_path):
    """A redis-server of this test's own (its memory limit is changed), as tests/conftest.py starts one."""
    proc, url = start_redis_server(tmp_path, "--maxmemory-policy", "noeviction", what="redis-server to start")
    yield url, redis.Redis.from_url(url)
    stop_redis_server(proc)


def test_a_full_redis_is_a_503_redis_full_and_nothing_of_the_batch_is_written(tmp_path, services, small_redis):
    url, client = small_redis
    make_service(services, "a", job("aJob", "a"))
    make_service(services, "b", job("bJob", "b", dependsOn="aJob"))
    app = create_app(settings_for(tmp_path, url, services), client)
    http = app.test_client()
    assert [r["status"] for r in results(http, instance_event("5.0"))] == ["scheduled"]  # scripts loaded
    before = {k: client.type(k) for k in client.keys("*")}
    valid = [instance_event("5.1"), instance_event("5.2")]
    mixed = [instance_event("5.3"), {**instance_event("5.4"), "orthanc": {}}]
    client.config_set("maxmemory", 1)  # Redis refuses every write that needs memory
    try:
        # Refused inside the planning script (EVALSHA), then in the invalid events' log (a pipeline).
        for batch in (valid, mixed):
            response = post(http, {"events": batch})
            assert response.status_code == 503, response.get_json()
            assert response.get_json()["error"] == "redis-full" and "maxmemory" in response.get_json()["message"]
            assert response.headers["Retry-After"] == "30"
            assert ("script" in response.get_json()["message"]) == (batch is valid)
        assert {k: client.type(k) for k in client.keys("*")} == before, "nothing of the batches was written"
    finally:
        client.config_set("maxmemory", 0)
    # The plugin sends the same batches again once Redis has room: all of them are planned.
    assert [r["status"] for r in results(http, *valid)] == ["scheduled", "scheduled"]
    assert [r["status"] for r in results(http, *mixed)] == ["scheduled", "invalid"]
    assert Queue("default", connection=client).count == 4  # aJob of 5.0-5.3 (each bJob waits for its aJob)
    assert client.hget(keys.STATS, "events:invalid") == b"1"


def test_out_of_memory_is_recognised_in_both_forms_redis_gives():
    from scheduler.app import _redis_full
    assert _redis_full(redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    # Redis 6 wraps a script's OOM into its own error.
    assert _redis_full(redis.ResponseError("Error running script (call to f_1): @user_script:5: @user_script: 5: "
                                           "-OOM command not allowed when used memory > 'maxmemory'."))
    assert not _redis_full(redis.ConnectionError("Connection refused"))
    assert not _redis_full(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
