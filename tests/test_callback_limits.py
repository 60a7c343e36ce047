"""Callbacks with a time limit (scheduler/callbacks.py): a hanging callback costs its own job,
not the pipeline (issue 16, case 8). Real Redis, the real app."""

from __future__ import annotations

import time

from rq.job import Job

from scheduler.app import create_app
from tests.support.services import AUTH, job, make_service, settings_for
from tests.support.services import instance_event as plain_event


def instance_event(sop: str) -> dict:
    """An instance event with Orthanc's ids, as the plugin sends it."""
    raw = plain_event(sop)
    raw["orthanc"] = {"instance": f"{abs(hash(sop)) % 16**8:08x}-00000000-00000000-00000000-00000000"}
    return raw

#: Hangs until the test lets it go (a file appears), at most a minute: a stand-in for sleep(3600)
#: that does not outlive the test.
HANGING = '''
import os, time

def callback(jobName, headers, params, added_params, **kwargs):
    deadline = time.monotonic() + 60
    while not os.path.exists(params["release"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True
'''


def test_a_hanging_callback_times_out_is_reported_and_switched_off(tmp_path, redis_url, services, connection):
    release = tmp_path / "release"
    make_service(services, "hang", job("hangJob", "hang", sortPosition=1, params={"release": str(release)}),
                 callback_code=HANGING)
    make_service(services, "fine", job("fineJob", "fine", sortPosition=2))
    app = create_app(settings_for(tmp_path, redis_url, services, DICOMFLOW_CALLBACK_TIMEOUT="0.3",
                                  DICOMFLOW_CALLBACK_STRIKES="2"), connection)
    client = app.test_client()
    try:
        results = []
        for n in range(3):
            started = time.monotonic()
            response = client.post("/api/v1/events", json={"events": [instance_event(f"8.{n}")]}, headers=AUTH)
            assert response.status_code == 200
            assert time.monotonic() - started < 5, "a hanging callback must not hold the request"
            results.append(response.get_json()["results"][0])
        for result in results:
            # The other service is planned and enqueued every time.
            assert result["status"] == "scheduled" and set(result["jobs"]) == {"fineJob"}
            assert Job.fetch(result["jobs"]["fineJob"], connection=connection).get_status() == "queued"
        # Twice timed out, reported like a raising callback ...
        for result in results[:2]:
            assert any(e.startswith("hangJob: CallbackTimeout") for e in result["errors"]), result
        errors = client.get("/api/v1/errors", headers=AUTH).get_json()["callbacks"]
        assert [e["jobName"] for e in errors] == ["hangJob", "hangJob"]
        # ... then switched off: not asked, said so, and listed for operators.
        assert "errors" not in results[2]
        assert any("hangJob: switched off" in note for note in results[2]["notes"])
        off = client.get("/api/v1/services", headers=AUTH).get_json()["switchedOff"]
        assert set(off) == {"hangJob"} and "timed out 2 times" in off["hangJob"]["reason"]
        assert connection.hexists("dicomflow:callbacks:suspended", "hangJob")
        # Resumed by an operator: asked again.
        release.touch()
        assert client.post("/api/v1/services/hangJob/resume", headers=AUTH).status_code == 200
        assert client.post("/api/v1/services/hangJob/resume", headers=AUTH).status_code == 404
        response = client.post("/api/v1/events", json={"events": [instance_event("8.9")]}, headers=AUTH)
        assert set(response.get_json()["results"][0]["jobs"]) == {"hangJob", "fineJob"}
    finally:
        release.touch()


def test_a_callback_that_answers_in_time_resets_the_count(tmp_path, redis_url, services, connection):
    release = tmp_path / "release"
    make_service(services, "hang", job("hangJob", "hang", params={"release": str(release)}), callback_code=HANGING)
    app = create_app(settings_for(tmp_path, redis_url, services, DICOMFLOW_CALLBACK_TIMEOUT="0.3",
                                  DICOMFLOW_CALLBACK_STRIKES="2"), connection)
    client = app.test_client()
    try:
        client.post("/api/v1/events", json={"events": [instance_event("8.1")]}, headers=AUTH)
        release.touch()
        response = client.post("/api/v1/events", json={"events": [instance_event("8.2")]}, headers=AUTH)
        (ok,) = response.get_json()["results"]
        assert set(ok["jobs"]) == {"hangJob"}
        release.unlink()
        client.post("/api/v1/events", json={"events": [instance_event("8.3")]}, headers=AUTH)
        assert client.get("/api/v1/services", headers=AUTH).get_json()["switchedOff"] == {}
    finally:
        release.touch()
