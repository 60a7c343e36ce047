"""The scheduler app with real Redis: planning, added_params, idempotency, errors, auth."""

from __future__ import annotations

import hashlib
import threading
import zlib
from pathlib import Path

import pytest
import redis
from rq import Queue, Retry, SimpleWorker
from rq.job import Dependency, Job, JobStatus
from rq.registry import DeferredJobRegistry

from bench.support import private_redis
from dicomflow import keys
from scheduler.app import create_app
from tests.support.procs import free_port
from tests.support.services import AUTH, job, make_service, settings_for
from tests.support.services import instance_event as _event_without_ids


def instance_event(sop: str, **kwargs) -> dict:
    """An instance event as the plugin sends it, with a well-formed Orthanc id (these tests
    never fetch the file; an instance event without one is invalid)."""
    event = _event_without_ids(sop, **kwargs)
    digest = hashlib.sha1(sop.encode()).hexdigest()
    event["orthanc"] = {"instance": "-".join(digest[i:i + 8] for i in range(0, 40, 8))}
    return event


@pytest.fixture()
def in_process_worker(tmp_path, redis_url, services, monkeypatch):
    """Jobs run by a SimpleWorker in this process: no Orthanc runs here, so their fetch fails
    at once instead of retrying for DICOMFLOW_ORTHANC_RETRY_SECONDS (only their end matters)."""
    from worker import runtime

    settings = settings_for(tmp_path, redis_url, services, DICOMFLOW_ORTHANC_RETRY_SECONDS="0",
                            ORTHANC_URL=f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(runtime, "_runtime", runtime.WorkerRuntime(settings))


def post(client, *events):
    response = client.post("/api/v1/events", json={"events": list(events)}, headers=AUTH)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


def test_jobs_are_enqueued_in_order_with_dependencies(make_client, services, connection):
    make_service(services, "a", job("aJob", "a", sortPosition=1))
    make_service(services, "b", job("bJob", "b", sortPosition=2))
    make_service(services, "c", job("cJob", "c", sortPosition=3, dependsOn=["aJob", "bJob"], priority="high"))
    (result,) = post(make_client(), instance_event("1.1"))
    assert result["status"] == "scheduled" and set(result["jobs"]) == {"aJob", "bJob", "cJob"}
    c = Job.fetch(result["jobs"]["cJob"], connection=connection)
    assert c.get_status() == JobStatus.DEFERRED and c.origin == "high"
    assert set(c.dependency_ids) == {result["jobs"]["aJob"], result["jobs"]["bJob"]}
    # What RQ's own enqueue of a dependent job writes: the deferred registry of its queue and
    # the reverse links its workers follow to enqueue it.
    assert DeferredJobRegistry("high", connection=connection).get_job_ids() == [c.id]
    for parent in ("aJob", "bJob"):
        assert connection.smembers(Job.dependents_key_for(result["jobs"][parent])) == {c.id.encode()}
    assert Queue("default", connection=connection).job_ids == [result["jobs"]["aJob"], result["jobs"]["bJob"]]
    # Later callbacks see what earlier ones added; every worker gets all of it.
    assert c.kwargs["added_params"]["cJob"]["seen"] == ["aJob", "bJob"]
    assert set(c.kwargs["added_params"]) == {"aJob", "bJob", "cJob"}


def test_job_hashes_hold_what_rq_writes_for_the_same_jobs(make_client, services, connection):
    """The scheduler writes job hashes itself (scheduler/jobhash.py): field for field what
    RQ's Job.create + save write for the same jobs, except data, which is not compressed,
    and the fields RQ writes empty (unset), which are left out; RQ reads both alike."""
    make_service(services, "a", job("aJob", "a", sortPosition=1, timeout="5m", retry={"max": 2, "interval": [1, 5]}))
    make_service(services, "b", job("bJob", "b", sortPosition=2, dependsOn="aJob", runOnDependencyFailure=True,
                                    priority="high"))
    (result,) = post(make_client(), instance_event("1.0"))
    a_id, b_id = result["jobs"]["aJob"], result["jobs"]["bJob"]
    written = {name: {k.decode(): v for k, v in connection.hgetall(Job.key_for(jid)).items()}
               for name, jid in result["jobs"].items()}
    assert written["aJob"]["created_at"] == written["aJob"]["enqueued_at"]
    a, b = Job.fetch(a_id, connection=connection), Job.fetch(b_id, connection=connection)
    reference = {
        "aJob": Job.create("worker.runtime.run_service_job", kwargs=a.kwargs, connection=connection, id=a_id,
                           origin="default", status=JobStatus.QUEUED, description="aJob instance 1.0",
                           timeout=300, result_ttl=86400, failure_ttl=7 * 86400, retry=Retry(max=2, interval=[1, 5]),
                           meta={"event": "instance:TEST:1.0", "service": "a", "notes": []}),
        "bJob": Job.create("worker.runtime.run_service_job", kwargs=b.kwargs, connection=connection, id=b_id,
                           origin="high", status=JobStatus.DEFERRED, description="bJob instance 1.0",
                           timeout=3600, result_ttl=86400, failure_ttl=7 * 86400,
                           depends_on=Dependency(jobs=[a_id], allow_failure=True),
                           meta={"event": "instance:TEST:1.0", "service": "b", "notes": []}),
    }
    reference["aJob"].enqueued_at = reference["aJob"].created_at
    encode = connection.get_encoder().encode
    fetched = {"aJob": a, "bJob": b}
    for name, rq_job in reference.items():
        expected = {k: encode(v) for k, v in rq_job.to_dict().items()}
        got = dict(written[name])
        assert got.pop("data") == zlib.decompress(expected.pop("data"))
        for stamp in ("created_at", "enqueued_at"):
            assert (stamp in got) == (stamp in expected)
            got.pop(stamp, None), expected.pop(stamp, None)
        unset = {k for k, v in expected.items() if v == b""}
        assert unset >= {"started_at", "ended_at", "worker_name", "last_heartbeat"}
        assert got == {k: v for k, v in expected.items() if k not in unset}
        # Read back by RQ, the job is the one RQ made: it writes the same hash again.
        again = fetched[name].to_dict()
        for field_name in ("data", "created_at", "enqueued_at"):
            again.pop(field_name, None)
        assert {k: encode(v) for k, v in again.items()} == expected
    # RQ reads them back as its own jobs.
    assert a.func_name == "worker.runtime.run_service_job" and a.kwargs["jobName"] == "aJob"
    assert a.retries_left == 2 and a.retry_intervals == [1, 5] and a.timeout == 300
    assert b.dependency_ids == [a_id] and b.allow_dependency_failures and b.meta["service"] == "b"
    assert connection.smembers(b.dependencies_key) == {a_id.encode()}


def test_declined_and_unscheduled_dependency_is_not_waited_for(make_client, services, connection):
    make_service(services, "a", job("aJob", "a", sortPosition=1),
                 callback_code="def callback(**kw):\n    return False\n")
    make_service(services, "b", job("bJob", "b", sortPosition=2, dependsOn="aJob"))
    (result,) = post(make_client(), instance_event("1.2"))
    assert result["declined"] == ["aJob"] and list(result["jobs"]) == ["bJob"]
    assert "bJob: dependency aJob was not scheduled for this event; not waited for" in result["notes"]
    assert Job.fetch(result["jobs"]["bJob"], connection=connection).get_status() == JobStatus.QUEUED


def test_raising_callback_is_recorded_and_others_run(make_client, services):
    make_service(services, "boom", job("boomJob", "boom"),
                 callback_code="def callback(**kw):\n    raise ValueError('bad header')\n")
    make_service(services, "fine", job("fineJob", "fine"))
    client = make_client()
    (result,) = post(client, instance_event("1.3"))
    assert list(result["jobs"]) == ["fineJob"]
    assert result["errors"] == ["boomJob: ValueError: bad header"]
    errors = client.get("/api/v1/errors", headers=AUTH).get_json()["callbacks"]
    assert errors[0]["jobName"] == "boomJob" and errors[0]["event"] == "instance:TEST:1.3"
    assert "ValueError: bad header" in errors[0]["traceback"]


def test_callback_with_unusable_result_is_an_error(make_client, services):
    make_service(services, "odd", job("oddJob", "odd"), callback_code="def callback(**kw):\n    return (1, 2, 3)\n")
    (result,) = post(make_client(), instance_event("1.4"))
    assert result["status"] == "nothing" and "expected a bool or (bool, dict)" in result["errors"][0]


def test_added_params_do_not_leak_between_concurrent_events(make_client, services, connection):
    make_service(services, "a", job("aJob", "a", sortPosition=1))
    make_service(services, "b", job("bJob", "b", sortPosition=2, dependsOn="aJob"))
    client = make_client()
    results: dict[str, dict] = {}

    def send(first: int):
        for i in range(first, 50, 10):  # 10 threads, interleaved SOP UIDs
            (res,) = post(client, instance_event(f"2.{i}", patient=f"P{i}"))
            results[f"2.{i}"] = res

    threads = [threading.Thread(target=send, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 50
    for sop, res in results.items():
        for job_id in res["jobs"].values():
            kwargs = Job.fetch(job_id, connection=connection).kwargs
            assert kwargs["headers"]["SOPInstanceUID"] == sop
            assert {v["sop"] for v in kwargs["added_params"].values()} == {sop}
            assert set(kwargs["added_params"]) == {"aJob", "bJob"}


def test_duplicate_instance_is_not_run_twice(make_client, services, connection, in_process_worker):
    make_service(services, "a", job("aJob", "a"))
    client = make_client()
    first, again_in_batch = post(client, instance_event("3.1"), instance_event("3.1"))
    assert first["status"] == "scheduled" and again_in_batch["status"] == "duplicate"
    (later,) = post(client, instance_event("3.1"))
    assert later["status"] == "duplicate" and later["jobs"] == first["jobs"]
    assert Queue("default", connection=connection).count == 1
    # Once the first run finished, a re-sent instance is processed again.
    SimpleWorker(["default"], connection=connection).work(burst=True)
    (rerun,) = post(client, instance_event("3.1"))
    assert rerun["status"] == "scheduled" and rerun["jobs"]["aJob"] != first["jobs"]["aJob"]


def test_invalid_events_are_reported_and_the_rest_planned(make_client, services):
    make_service(services, "a", job("aJob", "a"))
    client = make_client()
    bad = {"level": "instance", "headers": {"PatientID": "x"}}
    results = post(client, bad, instance_event("4.1"))
    assert results[0]["status"] == "invalid" and "without SOPInstanceUID" in results[0]["errors"][0]
    assert results[1]["status"] == "scheduled"
    assert "without SOPInstanceUID" in client.get("/api/v1/errors", headers=AUTH).get_json()["events"][0]["error"]
    stats = client.get("/api/v1/stats", headers=AUTH).get_json()
    assert stats["events:invalid"] == 1 and stats["events:scheduled"] == 1 and stats["jobs"] == 1


def test_authentication_and_bad_bodies(make_client):
    client = make_client()
    assert client.post("/api/v1/events", json={"events": []}).status_code == 401
    assert client.post("/api/v1/events", json={"events": []},
                       headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/v1/services").status_code == 401
    assert client.post("/api/v1/events", data="nope", headers=AUTH).status_code == 400
    assert client.post("/api/v1/events", json={"event": []}, headers=AUTH).status_code == 400
    assert client.get("/health").status_code == 200
    assert client.get("/api/v1/openapi.json").get_json()["openapi"].startswith("3.")


def test_services_endpoint_lists_jobs_inactive_and_problems(make_client, services):
    make_service(services, "a", job("aJob", "a"))
    make_service(services, "b", job("bJob", "b", requiresConfig="CHRIS_URL"))
    make_service(services, "c", "[]")
    body = make_client().get("/api/v1/services", headers=AUTH).get_json()
    assert [j["jobName"] for j in body["jobs"]] == ["aJob"]
    assert body["inactive"] == {"bJob": "waiting for configuration: CHRIS_URL"}
    assert body["problems"][0]["service"] == "c"


def test_redis_down_answers_503(tmp_path, services):
    make_service(services, "a", job("aJob", "a"))
    url = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(settings_for(tmp_path, url, services), redis.Redis.from_url(url))
    response = app.test_client().post("/api/v1/events", json={"events": [instance_event("5.1")]}, headers=AUTH)
    assert response.status_code == 503 and response.get_json()["error"] == "redis-unavailable"
    assert app.test_client().get("/health").status_code == 503


def test_a_batch_failing_half_way_in_redis_is_retried_without_loss_or_second_jobs(make_client, services, connection):
    make_service(services, "a", job("aJob", "a"))
    client = make_client()
    connection.set(keys.STATS, "not a hash")  # the batch's last write (its counters) fails: WRONGTYPE
    events = [instance_event("9.1"), instance_event("9.2")]
    response = client.post("/api/v1/events", json={"events": events}, headers=AUTH)
    assert response.status_code == 503 and response.get_json()["error"] == "redis-unavailable"
    assert connection.keys(keys.claim("*")) == [], "the failed batch's claims are released"
    connection.delete(keys.STATS)
    # The plugin sends the batch again: the writes that went through count, none is repeated.
    results = post(client, *events)
    assert [r["status"] for r in results] == ["duplicate", "duplicate"]
    queued = Queue("default", connection=connection).job_ids
    assert sorted(queued) == sorted(r["jobs"]["aJob"] for r in results)


def test_refuses_to_start_without_token(tmp_path, redis_url, services):
    from dicomflow.errors import ConfigError
    settings = settings_for(tmp_path, redis_url, services).model_copy(update={"scheduler_token": ""})
    with pytest.raises(ConfigError, match="DICOMFLOW_SCHEDULER_TOKEN"):
        create_app(settings)


def test_series_events_run_again_only_for_a_new_state(make_client, services, connection):
    make_service(services, "s", job("seriesJob", "s", triggerLevel="series"))
    make_service(services, "st", job("studyJob", "st", triggerLevel="study"))
    client = make_client()

    def series(*ids):
        return {"level": "series", "headers": {"SeriesInstanceUID": "9.9", "StudyInstanceUID": "9"},
                "orthanc": {"series": "os", "instances": list(ids)}}

    (first,) = post(client, series("i1", "i2"))
    assert first["status"] == "scheduled" and list(first["jobs"]) == ["seriesJob"]
    (same,) = post(client, series("i2", "i1"))
    assert same["status"] == "unchanged"
    (grown,) = post(client, series("i1", "i2", "i3"))
    assert grown["status"] == "scheduled"
    event = Job.fetch(grown["jobs"]["seriesJob"], connection=connection).kwargs["event"]
    assert event["newMembers"] == ["i3"] and event["orthanc"]["instances"] == ["i1", "i2", "i3"]
    study = {"level": "study", "headers": {"StudyInstanceUID": "9"},
             "orthanc": {"study": "ost", "seriesIds": ["os"], "instances": ["i1", "i2", "i3"]}}
    (st,) = post(client, study)
    assert st["status"] == "scheduled" and list(st["jobs"]) == ["studyJob"]
    assert post(client, study)[0]["status"] == "unchanged"


def test_unpicklable_callback_data_fails_only_that_job(make_client, services):
    make_service(services, "lock", job("lockJob", "lock", sortPosition=1),
                 callback_code="import threading\ndef callback(**kw):\n    return True, {'l': threading.Lock()}\n")
    make_service(services, "fine", job("fineJob", "fine", sortPosition=2))
    (result,) = post(make_client(), instance_event("6.1"))
    assert list(result["jobs"]) == ["fineJob"] and "cannot pickle" in result["errors"][0]


def test_an_event_claimed_elsewhere_makes_the_batch_retry_and_nothing_is_lost(make_client, services, connection):
    make_service(services, "a", job("aJob", "a"))
    client = make_client()
    connection.set("dicomflow:claim:instance:TEST:6.2", "another-request", px=60_000)
    busy = client.post("/api/v1/events", json={"events": [instance_event("6.3"), instance_event("6.2")]},
                       headers=AUTH)
    assert busy.status_code == 503 and busy.get_json()["error"] == "busy"
    assert not connection.exists("dicomflow:claim:instance:TEST:6.3"), "our own claims are released"
    assert connection.get("dicomflow:claim:instance:TEST:6.2") == b"another-request", "never someone else's"
    assert Queue("default", connection=connection).count == 0
    connection.delete("dicomflow:claim:instance:TEST:6.2")
    assert [r["status"] for r in post(client, instance_event("6.3"), instance_event("6.2"))] == ["scheduled"] * 2
    assert connection.keys("dicomflow:claim:*") == []


def test_a_failed_run_does_not_block_a_resent_instance(make_client, services, connection, in_process_worker):
    make_service(services, "a", job("aJob", "a", sortPosition=1, params={"fail": True}))
    make_service(services, "b", job("bJob", "b", sortPosition=2, dependsOn="aJob"))
    client = make_client()
    (first,) = post(client, instance_event("6.4"))
    SimpleWorker(["default"], connection=connection).work(burst=True)
    assert Job.fetch(first["jobs"]["bJob"], connection=connection).get_status() == JobStatus.DEFERRED
    (again,) = post(client, instance_event("6.4"))
    assert again["status"] == "scheduled"


def test_a_series_nobody_took_is_not_marked_handled(make_client, services, connection):
    make_service(services, "s", job("seriesJob", "s", triggerLevel="series"),
                 callback_code="def callback(**kw):\n    raise RuntimeError('not yet')\n")
    client = make_client()
    series = {"level": "series", "headers": {"SeriesInstanceUID": "8.8"}, "orthanc": {"instances": ["i1"]}}
    assert post(client, series)[0]["status"] == "nothing"
    assert post(client, series)[0]["status"] == "nothing", "sent again, it is planned again"


def test_a_replayed_instance_runs_only_if_no_copy_was_scheduled(make_client, services, connection,
                                                               in_process_worker):
    make_service(services, "a", job("aJob", "a"))
    client = make_client()
    (first,) = post(client, instance_event("1.40"))
    SimpleWorker(["default"], connection=connection).work(burst=True)  # its run is over
    # Orthanc restarted after a crash: the plugin re-reads instances past its checkpoint.
    # Unlike a re-sent instance (which runs again once its first run is over), a replayed
    # copy of a scheduled instance is not run again.
    replayed, unseen = post(client, {**instance_event("1.40"), "replay": True},
                            {**instance_event("1.41"), "replay": True})
    assert replayed["status"] == "known" and replayed["jobs"] == first["jobs"]
    assert unseen["status"] == "scheduled"
    assert Queue("default", connection=connection).job_ids == [unseen["jobs"]["aJob"]]
    assert Job.fetch(unseen["jobs"]["aJob"], connection=connection).kwargs["event"]["replay"] is True
    assert int(connection.hget("dicomflow:stats", "events:known")) == 1


def test_a_replayed_instance_nobody_wanted_is_not_planned_again(make_client, services, connection):
    # Declines the first time only: a replay planned again would be scheduled.
    make_service(services, "once", job("onceJob", "once"), callback_code=(
        "CALLS = []\n"
        "def callback(**kw):\n"
        "    CALLS.append(1)\n"
        "    return len(CALLS) > 1\n"))
    client = make_client()
    (first,) = post(client, instance_event("1.42"))
    assert first["status"] == "nothing"
    (replayed,) = post(client, {**instance_event("1.42"), "replay": True})
    assert replayed["status"] == "known" and "jobs" not in replayed
    assert Queue("default", connection=connection).count == 0


def test_claims_stay_out_of_the_append_only_file(tmp_path, services):
    """A claim locks an event while one request plans it, and a Redis restart ends that
    request anyway: the append-only file gets the batch's jobs, not its claims."""
    make_service(services, "a", job("aJob", "a"))
    with private_redis(aof=True) as url:
        connection = redis.Redis.from_url(url)
        client = create_app(settings_for(tmp_path, url, services), connection).test_client()
        results = post(client, instance_event("11.1"), instance_event("11.2"))
        assert [r["status"] for r in results] == ["scheduled", "scheduled"]
        folder = Path(connection.config_get("dir")["dir"]) / connection.config_get("appenddirname")["appenddirname"]
        written = b"".join(path.read_bytes() for path in folder.glob("*.incr.aof"))
        assert all(f"rq:job:{r['jobs']['aJob']}".encode() in written for r in results)
        assert keys.claim("").encode() not in written
        # The claims did their work in memory: a second copy of the batch is a duplicate.
        assert [r["status"] for r in post(client, instance_event("11.1"))] == ["duplicate"]
