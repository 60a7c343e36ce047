"""Series/study completion owned by the pipeline (scheduler/pushes.py), with a real Redis.

Issue 16, cases 1-3 and 7 at the scheduler's level: a push per sender, fired StableAge after
its last instance, durable across a scheduler restart, never fired twice; re-deliveries and
claims taken over while planning never enqueue twice.
"""

from __future__ import annotations

import threading
import time

import pytest
from rq.job import Job

from dicomflow import keys
from dicomflow.events import Event
from scheduler.app import create_app
from scheduler.enqueue import EventsBusy
from tests.support.services import AUTH, instance_event, job, make_service, settings_for

SERIES = "1.2.3"


def orthanc_id(n: int) -> str:
    return f"{n:08x}-00000000-00000000-00000000-00000000"


def event(n: int, aet: str = "TEST", received: float | None = None, **headers) -> dict:
    raw = instance_event(f"9.{n}", **headers)
    raw["remoteAet"] = aet
    raw["orthanc"] = {"instance": orthanc_id(n), "series": "s" * 8, "study": "t" * 8, "patient": "p" * 8}
    raw["receivedAt"] = received if received is not None else time.time()
    return raw


@pytest.fixture()
def series_services(services):
    make_service(services, "inst", job("instJob", "inst"))
    make_service(services, "ser", job("serJob", "ser", triggerLevel="series"))
    make_service(services, "stu", job("stuJob", "stu", triggerLevel="study"))
    return services


@pytest.fixture()
def scheduler(tmp_path, redis_url, series_services, connection):
    def make():
        app = create_app(settings_for(tmp_path, redis_url, series_services, ORTHANC_STABLE_AGE="5"), connection)
        return app, app.test_client()
    return make


def post(client, *events):
    response = client.post("/api/v1/events", json={"events": list(events)}, headers=AUTH)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["results"]


def fire(app, at: float):
    return app.extensions["dicomflow"].completer.fire_due(now=at)


def series_events(connection, results) -> list[dict]:
    """The `event` keyword of each fired series job."""
    return [Job.fetch(r["jobs"]["serJob"], connection=connection).kwargs["event"]
            for r in results if "serJob" in r.get("jobs", {})]


def test_a_push_fires_once_stable_age_after_its_last_instance(scheduler, connection):
    app, client = scheduler()
    start = time.time()
    post(client, *(event(n) for n in range(3)))
    assert fire(app, start + 1) == [], "not due before the stable age"
    post(client, event(3))
    results = fire(app, time.time() + 6)
    by_level = {r["key"].split(":", 1)[0]: r for r in (x.as_dict() for x in results)}
    assert set(by_level) == {"series", "study"}
    fired = Job.fetch(by_level["series"]["jobs"]["serJob"], connection=connection).kwargs["event"]
    assert fired["orthanc"]["instances"] == [orthanc_id(n) for n in range(4)]
    assert fired["push"] and by_level["series"]["key"] == f"series:TEST:{SERIES}:{fired['push']}"
    assert fired["remoteAet"] == "TEST" and fired["orthanc"]["series"] == "s" * 8
    headers = Job.fetch(by_level["series"]["jobs"]["serJob"], connection=connection).kwargs["headers"]
    assert headers["SeriesInstanceUID"] == SERIES and "SOPInstanceUID" not in headers
    assert fire(app, time.time() + 60) == [], "a push fires once"
    assert connection.zcard(keys.PUSHES_DUE) == 0 and not connection.keys(f"{keys.PREFIX}push:*")


def test_the_same_series_from_two_senders_is_two_pushes_and_no_instance_is_a_duplicate(scheduler, connection):
    app, client = scheduler()
    results = post(client, *(event(n, "AE_ONE") for n in range(3)), *(event(n, "AE_TWO") for n in range(3)))
    assert [r["status"] for r in results] == ["scheduled"] * 6, "another sender's copy is another event"
    fired = series_events(connection, [r.as_dict() for r in fire(app, time.time() + 6)])
    assert sorted(e["remoteAet"] for e in fired) == ["AE_ONE", "AE_TWO"]
    assert all(len(e["orthanc"]["instances"]) == 3 for e in fired)
    assert fired[0]["push"] != fired[1]["push"]


def test_a_resend_after_completion_is_a_new_push(scheduler, connection):
    app, client = scheduler()
    post(client, *(event(n) for n in range(2)))
    first = series_events(connection, [r.as_dict() for r in fire(app, time.time() + 6)])
    # The same instances again from the same sender (after deletion in Orthanc, say).
    post(client, *(event(n) for n in range(2)))
    second = series_events(connection, [r.as_dict() for r in fire(app, time.time() + 6)])
    assert len(first) == len(second) == 1 and first[0]["push"] != second[0]["push"]
    assert second[0]["orthanc"]["instances"] == first[0]["orthanc"]["instances"]


def test_open_pushes_survive_a_scheduler_restart(scheduler, connection):
    app, client = scheduler()
    post(client, *(event(n) for n in range(3)))
    del app, client  # the scheduler stops before the series is stable
    restarted, _ = scheduler()
    fired = series_events(connection, [r.as_dict() for r in fire(restarted, time.time() + 6)])
    assert len(fired) == 1 and len(fired[0]["orthanc"]["instances"]) == 3


def test_a_push_that_grew_after_it_was_read_is_not_fired_short(scheduler, connection, monkeypatch):
    """The completer reads a due push, then an instance arrives before it fires: the guard
    refuses the stale push; the next poll fires it whole, once."""
    app, client = scheduler()
    post(client, *(event(n) for n in range(2)))
    completer = app.extensions["dicomflow"].completer
    submit = completer.enqueuer.submit

    def late_instance_first(*args, **kwargs):
        monkeypatch.setattr(completer.enqueuer, "submit", submit)
        post(client, event(7))
        return submit(*args, **kwargs)
    monkeypatch.setattr(completer.enqueuer, "submit", late_instance_first)
    first = [r.as_dict() for r in fire(app, time.time() + 6)]
    assert [r["key"].split(":")[0] for r in first] == ["study"], "the series that grew waits for the next poll"
    fired = series_events(connection, [r.as_dict() for r in fire(app, time.time() + 6)])
    assert len(fired) == 1 and len(fired[0]["orthanc"]["instances"]) == 3
    study = Job.fetch(first[0]["jobs"]["stuJob"], connection=connection).kwargs["event"]
    assert len(study["orthanc"]["instances"]) == 3


def test_concurrent_completers_fire_each_push_once(scheduler, connection):
    apps = [scheduler()[0] for _ in range(4)]
    post(apps[0].test_client(), *(event(n) for n in range(5)))
    at = time.time() + 6
    fired: list = []
    barrier = threading.Barrier(len(apps))

    def run(app):
        barrier.wait()
        fired.extend(r.as_dict() for r in fire(app, at))
    threads = [threading.Thread(target=run, args=(a,)) for a in apps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r["key"].split(":", 1)[0] for r in fired) == ["series", "study"]


def test_a_redelivered_capture_is_known_and_never_runs_again(scheduler, connection):
    """The plugin re-sends a batch whose answer it lost (timeout): the same capture
    (same receivedAt) is `known` even after its jobs finished; a real re-send is scheduled."""
    _, client = scheduler()
    captured = event(1, received=1_700_000_000.25)
    (first,) = post(client, captured)
    connection.hset(Job.key_for(first["jobs"]["instJob"]), "status", "finished")
    (again,) = post(client, captured)
    assert again["status"] == "known" and again["jobs"] == first["jobs"]
    (resent,) = post(client, event(1, received=1_700_000_100.5))
    assert resent["status"] == "scheduled" and resent["jobs"] != first["jobs"]


SLOW_CALLBACK = '''
import redis

def callback(jobName, headers, params, added_params, **kwargs):
    # What a claim expiring during a slow callback looks like: another request takes it over.
    client = redis.Redis.from_url(params["redis"])
    for key in client.scan_iter("dicomflow:claim:*"):
        client.set(key, "another-request")
    return True
'''


def test_a_request_whose_claim_was_taken_over_enqueues_nothing(tmp_path, redis_url, services, connection):
    make_service(services, "slow", job("slowJob", "slow", params={"redis": redis_url}), callback_code=SLOW_CALLBACK)
    app = create_app(settings_for(tmp_path, redis_url, services), connection)
    response = app.test_client().post("/api/v1/events", json={"events": [event(1)]}, headers=AUTH)
    assert response.status_code == 503 and response.get_json()["error"] == "busy"
    assert not connection.keys("rq:job:*") and not connection.llen("rq:queue:default")
    assert not connection.exists(keys.event_run("instance:TEST:9.1"))
    with pytest.raises(EventsBusy):
        state = app.extensions["dicomflow"]
        state.enqueuer.submit([Event.model_validate(event(2))], state.registry.current())


SLOWISH_CALLBACK = '''
import time

def callback(jobName, headers, params, added_params, **kwargs):
    time.sleep(params["seconds"])
    return True
'''


def test_claims_are_renewed_while_a_long_batch_is_planned(tmp_path, redis_url, services, connection, monkeypatch):
    """A batch whose callbacks take longer than a claim lives still enqueues (once): its claims
    are renewed between events. Claims of 0.6 s here, 0.25 s of callback per event."""
    import scheduler.enqueue as enqueue

    monkeypatch.setattr(enqueue, "CLAIM_MS", 600)
    make_service(services, "slowish", job("slowishJob", "slowish", params={"seconds": 0.25}),
                 callback_code=SLOWISH_CALLBACK)
    app = create_app(settings_for(tmp_path, redis_url, services), connection)
    response = app.test_client().post("/api/v1/events", json={"events": [event(n) for n in range(5)]},
                                      headers=AUTH)
    assert response.status_code == 200, response.get_json()
    assert [r["status"] for r in response.get_json()["results"]] == ["scheduled"] * 5
    assert connection.llen("rq:queue:default") == 5
    assert not connection.keys("dicomflow:claim:*"), "released after the write"
