"""Retention waits for every service to finish with a study (issue 16, item 14): the scheduler's
per-study job state, asked by the plugin's retention (orthanc/dicomflow_disk.py) over HTTP.

The real scheduler app on a real Redis, served by werkzeug in a thread; real RQ jobs drained by
a SimpleWorker.
"""

from __future__ import annotations

import sys
import threading

import pytest
from rq import Queue, SimpleWorker
from werkzeug.serving import make_server

from scheduler.app import create_app
from tests.conftest import REPO
from tests.support.procs import free_port
from tests.support.services import AUTH, job, make_service, settings_for
from tests.test_execution import instance_event

sys.path.insert(0, str(REPO / "orthanc"))
import dicomflow_disk as disk  # noqa: E402 - the plugin's module, standard library only

FAILING_WORKER = '''
def worker(jobName, headers, params, added_params, **kwargs):
    if params.get("fail"):
        raise RuntimeError("fails on purpose")
    return "ok"
'''


@pytest.fixture()
def scheduler(tmp_path, redis_url, services, connection):
    app = create_app(settings_for(tmp_path, redis_url, services), connection)
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield app, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def study(uid: str) -> dict:
    """A study as Orthanc's `/studies?expand` lists it."""
    return {"ID": "x", "MainDicomTags": {"StudyInstanceUID": uid}}


@pytest.fixture()
def drain(tmp_path, redis_url, services, connection, monkeypatch):
    """Run the queued jobs in this process, with the worker runtime of these services."""
    from worker import runtime

    settings = settings_for(tmp_path, redis_url, services, DICOMFLOW_ORTHANC_RETRY_SECONDS="0")
    monkeypatch.setattr(runtime, "_runtime", runtime.WorkerRuntime(settings))

    def run(*events: dict) -> None:
        for event in events:  # the files the jobs would fetch from Orthanc (none runs here)
            (settings.effective_cache_dir / "instances" / f"{event['orthanc']['instance']}.dcm").write_bytes(b"x")
        SimpleWorker([Queue("default", connection=connection)], connection=connection).work(burst=True)
    return run


def test_a_study_is_finished_once_every_job_of_it_finished(scheduler, services, drain):
    make_service(services, "a", job("aJob", "a"), worker_code=FAILING_WORKER)
    app, url = scheduler
    finished = disk.scheduler_finished(url, "test-token")
    events = [instance_event("3.1", StudyInstanceUID="7.1"), instance_event("3.2", StudyInstanceUID="7.1")]
    response = app.test_client().post("/api/v1/events", headers=AUTH, json={"events": events})
    assert response.status_code == 200
    assert not finished(study("7.1")), "two jobs queued"
    answer = app.test_client().get("/api/v1/studies/7.1/jobs", headers=AUTH).get_json()
    assert answer["jobs"] == {"queued": 2} and answer["pending"] == 2 and answer["finished"] is False
    drain(*events)
    assert finished(study("7.1"))
    assert app.test_client().get("/api/v1/studies/7.1/jobs", headers=AUTH).get_json()["jobs"] == {"finished": 2}
    # A study the pipeline never saw has nothing pending.
    assert finished(study("9.9"))


def test_a_failed_job_keeps_its_study(scheduler, services, drain):
    make_service(services, "a", job("aJob", "a", params={"fail": True}), worker_code=FAILING_WORKER)
    app, url = scheduler
    event = instance_event("3.3", StudyInstanceUID="7.2")
    app.test_client().post("/api/v1/events", headers=AUTH, json={"events": [event]})
    drain(event)
    assert not disk.scheduler_finished(url, "test-token")(study("7.2"))


def test_without_an_answer_the_study_is_kept(scheduler):
    _, url = scheduler
    assert not disk.scheduler_finished(url, "wrong-token")(study("7.1")), "401"
    assert not disk.scheduler_finished(f"http://127.0.0.1:{free_port()}", "t")(study("7.1")), "unreachable"
    assert not disk.scheduler_finished(url, "test-token")({"ID": "x", "MainDicomTags": {}}), "no UID"
