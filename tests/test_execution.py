"""Running jobs with real RQ worker processes: order, failures, finalisers, timeouts, retries."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rq.job import Job, JobStatus

from tests.conftest import REPO
from tests.support.services import AUTH, job, make_service
from tests.support.services import instance_event as _event_without_ids


def instance_event(sop: str, **kwargs) -> dict:
    """An instance event as the plugin sends it, with a well-formed Orthanc id whose file
    `submit` puts in the workers' cache (no Orthanc runs here)."""
    event = _event_without_ids(sop, **kwargs)
    digest = hashlib.sha1(sop.encode()).hexdigest()
    event["orthanc"] = {"instance": "-".join(digest[i:i + 8] for i in range(0, 40, 8))}
    return event


@pytest.fixture()
def submit(make_client, tmp_path):
    def submit(*events):
        cache = tmp_path / "home" / "cache" / "instances"  # the workers' DICOMFLOW_HOME (run_workers)
        cache.mkdir(parents=True, exist_ok=True)
        for event in events:
            if event.get("orthanc", {}).get("instance"):
                (cache / f"{event['orthanc']['instance']}.dcm").write_bytes(b"not really DICOM")
        response = make_client().post("/api/v1/events", json={"events": list(events)}, headers=AUTH)
        assert response.status_code == 200
        return response.get_json()["results"]
    return submit


@pytest.fixture()
def run_workers(tmp_path, redis_url, services):
    """Run N real `dicomflow-worker --burst` processes until the queues are drained."""
    def run(count: int = 2, worker_class: str = "simple"):
        env = {**os.environ, "DICOMFLOW_REDIS_URL": redis_url, "DICOMFLOW_SERVICES_DIR": str(services),
               "DICOMFLOW_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
        procs = [subprocess.Popen([sys.executable, "-m", "worker.cli", "--burst", "--worker-class", worker_class],
                                  env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for _ in range(count)]
        outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
        return outputs
    return run


def log_entries(connection) -> list[dict]:
    return [json.loads(e) for e in connection.lrange("test:log", 0, -1)]


def status(connection, job_id: str) -> JobStatus:
    return Job.fetch(job_id, connection=connection).get_status()


@pytest.mark.parametrize("worker_class", ["simple", "fork"])
def test_dependents_start_after_all_their_dependencies(services, submit, run_workers, connection, worker_class):
    make_service(services, "a", job("aJob", "a", sortPosition=1, params={"sleep": 0.3}))
    make_service(services, "b", job("bJob", "b", sortPosition=2, params={"sleep": 0.1}))
    make_service(services, "c", job("cJob", "c", sortPosition=3, dependsOn=["aJob", "bJob"]))
    make_service(services, "d", job("dJob", "d", sortPosition=4, dependsOn="cJob", priority="high"))
    results = submit(instance_event("7.1"), instance_event("7.2"))
    run_workers(2, worker_class)
    entries = log_entries(connection)
    for res in results:
        sop = res["key"].rsplit(":", 1)[1]
        at = {(e["job"], e["what"]): e["at"] for e in entries if e["sop"] == sop}
        assert len(at) == 8, at
        assert at[("cJob", "start")] >= max(at[("aJob", "end")], at[("bJob", "end")])
        assert at[("dJob", "start")] >= at[("cJob", "end")]
        for job_id in res["jobs"].values():
            assert status(connection, job_id) == JobStatus.FINISHED
    result = Job.fetch(results[0]["jobs"]["dJob"], connection=connection).return_value()
    assert result["sop"] == "7.1" and set(result["added_params"]) == {"aJob", "bJob", "cJob", "dJob"}


def test_failed_job_blocks_dependents_but_runs_its_finaliser(services, submit, run_workers, connection):
    make_service(services, "a", job("aJob", "a", sortPosition=1, params={"fail": True}))
    make_service(services, "b", job("bJob", "b", sortPosition=2, dependsOn="aJob"))
    make_service(services, "cleanup", job("cleanupJob", "cleanup", sortPosition=3, dependsOn="aJob",
                                          runOnDependencyFailure=True))
    (res,) = submit(instance_event("8.1"))
    run_workers(1)
    assert status(connection, res["jobs"]["aJob"]) == JobStatus.FAILED
    assert "aJob fails on purpose" in Job.fetch(res["jobs"]["aJob"], connection=connection).latest_result().exc_string
    assert status(connection, res["jobs"]["bJob"]) == JobStatus.DEFERRED
    assert status(connection, res["jobs"]["cleanupJob"]) == JobStatus.FINISHED
    assert [e["job"] for e in log_entries(connection)] == ["aJob", "cleanupJob", "cleanupJob"]


def test_failed_job_is_rerunnable_and_then_releases_dependents(services, submit, run_workers, connection):
    make_service(services, "a", job("aJob", "a", sortPosition=1),
                 worker_code="""
def worker(connection=None, **kw):
    if connection.incr("test:attempts") == 1:
        raise RuntimeError("first attempt fails")
    return "ok"
""")
    make_service(services, "b", job("bJob", "b", sortPosition=2, dependsOn="aJob"))
    (res,) = submit(instance_event("8.2"))
    run_workers(1)
    assert status(connection, res["jobs"]["aJob"]) == JobStatus.FAILED
    from rq.job import requeue_job
    requeue_job(res["jobs"]["aJob"], connection=connection)
    run_workers(1)
    assert status(connection, res["jobs"]["aJob"]) == JobStatus.FINISHED
    assert status(connection, res["jobs"]["bJob"]) == JobStatus.FINISHED


def test_timeout_kills_a_slow_job(services, submit, run_workers, connection):
    make_service(services, "slow", job("slowJob", "slow", timeout="1s", params={"sleep": 30}))
    (res,) = submit(instance_event("9.1"))
    run_workers(1)
    job_ = Job.fetch(res["jobs"]["slowJob"], connection=connection)
    assert job_.get_status() == JobStatus.FAILED
    assert "JobTimeoutException" in job_.latest_result().exc_string
    assert [e["what"] for e in log_entries(connection)] == ["start"]


def test_retry_runs_a_failed_job_again(services, submit, run_workers, connection):
    make_service(services, "flaky", job("flakyJob", "flaky", retry={"max": 2, "interval": 0}),
                 worker_code="""
def worker(connection=None, **kw):
    n = connection.incr("test:flaky")
    if n < 3:
        raise RuntimeError(f"attempt {n} fails")
    return n
""")
    (res,) = submit(instance_event("9.2"))
    run_workers(1)
    job_ = Job.fetch(res["jobs"]["flakyJob"], connection=connection)
    assert job_.get_status() == JobStatus.FINISHED and job_.return_value() == 3


def test_an_instance_worker_gets_its_file_from_the_cache_as_dcmpath(services, submit, run_workers, connection,
                                                                    tmp_path):
    make_service(services, "p", job("pJob", "p"), worker_code="""
def worker(dcmpath=None, event=None, config=None, **kw):
    return {"dcmpath": dcmpath, "level": event["level"], "has_config": "DICOMFLOW_REDIS_URL" in config}
""")
    event = instance_event("9.3")
    (res,) = submit(event)
    run_workers(1)
    cached = tmp_path / "home" / "cache" / "instances" / f"{event['orthanc']['instance']}.dcm"
    assert Job.fetch(res["jobs"]["pJob"], connection=connection).return_value() == {
        "dcmpath": str(cached), "level": "instance", "has_config": True}


def test_a_batched_job_gets_every_instance_file_and_its_own_keywords(services, submit, run_workers, connection,
                                                                     tmp_path):
    make_service(services, "b", job("bJob", "b", batchSize=4), worker_code="""
from pathlib import Path

def worker(dcmpath=None, batch=None, headers=None, **kw):
    return {"folder": dcmpath, "headers": headers["SOPInstanceUID"],
            "items": [(item["headers"]["SOPInstanceUID"], item["dcmpath"], Path(item["dcmpath"]).read_bytes().decode(),
                       Path(item["dcmpath"]).parent == Path(dcmpath)) for item in batch]}
""")
    events = [instance_event(f"9.4.{i}") for i in range(5)]
    results = submit(*events)
    run_workers(1)
    first = Job.fetch(results[0]["jobs"]["bJob"], connection=connection).return_value()
    assert first["headers"] == "9.4.0"
    assert [(sop, text, inside) for sop, _, text, inside in first["items"]] == [
        (f"9.4.{i}", "not really DICOM", True) for i in range(4)]
    assert [Path(path).name for _, path, _, _ in first["items"]] == [
        f"{e['orthanc']['instance']}.dcm" for e in events[:4]]
    assert not Path(first["folder"]).exists(), "the job's folder is removed when it ends"
    last = Job.fetch(results[4]["jobs"]["bJob"], connection=connection).return_value()
    assert [sop for sop, _, _, _ in last["items"]] == ["9.4.4"]


def test_workers_import_service_packages_at_start_and_survive_a_broken_one(services, submit, run_workers,
                                                                           connection, tmp_path):
    marker = tmp_path / "imported"
    make_service(services, "good", job("goodJob", "good"), worker_code=f"""
import os
with open({str(marker)!r}, "a") as f:
    f.write(str(os.getpid()) + "\\n")

def worker(**kw):
    return "ran"
""")
    make_service(services, "broken", job("brokenJob", "broken"), worker_code="raise ImportError('no such thing')\n")
    outputs = run_workers(1)  # no job queued yet: the worker only starts and stops
    assert len(marker.read_text().split()) == 1, "imported when the worker started, without any job"
    assert "service package broken does not import" in outputs[0] and "no such thing" in outputs[0]
    (res,) = submit(instance_event("9.5"))
    run_workers(1)
    assert Job.fetch(res["jobs"]["goodJob"], connection=connection).return_value() == "ran"
    failed = Job.fetch(res["jobs"]["brokenJob"], connection=connection)
    assert failed.get_status() == JobStatus.FAILED and "no such thing" in failed.latest_result().exc_string
