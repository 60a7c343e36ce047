"""worker/ahead.py with the ChRIS service: a lone worker begins the next job's first instance
while its own job waits for CUBE's last answers, so that CUBE does not idle between two jobs
(issue 23). Real Redis, a real Orthanc (no plugin) holding the files, the real worker runtime
and RQ's SimpleWorker, the CUBE double (cube.md) with a cost per registration.
"""

from __future__ import annotations

import calendar
import os
import shutil
import subprocess
import sys
import threading

import pydicom
import pytest
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry

from dicomflow.chris.progress import series_progress
from tests.support.chris_env import AET, SAG_FOLDER, SAG_SERIES_UID, SERVICE_MODULES, chris_config
from tests.support.procs import wait_for
from tests.support.services import settings_for
from tests.support.stack import REPO
from worker import ahead, runtime


@pytest.fixture()
def orthanc(plain_orthanc):
    return plain_orthanc


@pytest.fixture()
def stored(orthanc, sag_anon, tmp_path):
    """(Orthanc ids, files) of the first 8 sag-anon files, stored in Orthanc."""
    files = sorted(sag_anon.glob("*.dcm"))[:8]
    return [orthanc.post("/instances", f.read_bytes())["ID"] for f in files], files


@pytest.fixture()
def lone_worker(tmp_path, redis_url, services, orthanc, make_cube, monkeypatch):
    """(the runtime, the CUBE double): the chris service as its worker runtime runs it."""
    monkeypatch.syspath_prepend(str(SERVICE_MODULES))
    cube = make_cube("cube5", write_cost=0.05)
    settings = settings_for(tmp_path, redis_url, services, ORTHANC_URL=orthanc.url,
                            ORTHANC_USERNAME=orthanc.username, ORTHANC_PASSWORD=orthanc.password,
                            **chris_config(cube, CHRIS_REGISTRATION="pacsfiles"))
    worker_runtime = runtime.WorkerRuntime(settings)
    monkeypatch.setattr(runtime, "_runtime", worker_runtime)
    return worker_runtime, cube


def _enqueue(queue: Queue, ids: list[str]):
    items = [{"headers": {}, "added_params": {},
              "event": {"level": "instance", "orthanc": {"instance": i}, "remoteAet": AET}} for i in ids]
    return queue.enqueue("worker.runtime.run_service_job", jobName="chrisStore", worker="chris.store", headers={},
                         params={}, added_params={}, event=items[0]["event"], batch=items)


def _posts(cube) -> list:
    return [r for r in cube.registrations() if r.body["path"].startswith(SAG_FOLDER + "/")]


def _started(job) -> float:
    moment = job.started_at
    return calendar.timegm(moment.utctimetuple()) + moment.microsecond / 1e6


def test_a_lone_worker_registers_the_next_jobs_first_instance_before_that_job_starts(
        lone_worker, connection, stored):
    _, cube = lone_worker
    ids, files = stored
    high = Queue("high", connection=connection)
    first, second = _enqueue(high, ids[:4]), _enqueue(high, ids[4:])
    SimpleWorker([high], connection=connection).work(burst=True)
    assert first.get_status(refresh=True) == second.get_status(refresh=True) == JobStatus.FINISHED
    posts = _posts(cube)
    assert len(posts) == 8 and {r.status for r in posts} == {201}, "each instance registered once"
    second.refresh()
    early = [r for r in posts if r.arrived < _started(second)]
    assert len(early) == 5, "the second job's first instance reached CUBE before the second job started"
    assert second.return_value()["registered"] == 4 and second.return_value()["stored"] == 4
    progress = series_progress(connection, AET, SAG_SERIES_UID)
    assert progress["stored"] == 8 and progress["registered"] == 8 and progress["errors"] == {}


def test_no_head_start_when_another_worker_could_take_the_next_job(lone_worker, connection, stored):
    """With a second worker on the queue, that worker may start the next job itself: beginning
    it here too would send CUBE the same registration twice."""
    _, cube = lone_worker
    ids, _ = stored
    high = Queue("high", connection=connection)
    other = SimpleWorker([high], connection=connection, name="other")
    other.register_birth()
    try:
        _, second = _enqueue(high, ids[:4]), _enqueue(high, ids[4:])
        SimpleWorker([high], connection=connection).work(burst=True)
    finally:
        other.register_death()
    second.refresh()
    posts = _posts(cube)
    assert len(posts) == 8
    assert len([r for r in posts if r.arrived < _started(second)]) == 4, "nothing of the second job began early"


def test_a_head_start_that_fails_fails_its_own_job_which_retries_it(lone_worker, connection, stored, orthanc,
                                                                    tmp_path):
    """The next job's first instance, begun early, cannot be registered (no StudyDate): the job
    it belongs to fails naming it, as if it had run it itself; the first job is untouched, and
    the retry (with the instance fixed) registers it."""
    _, cube = lone_worker
    ids, files = stored
    broken = tmp_path / "broken.dcm"
    shutil.copyfile(files[4], broken)
    dataset = pydicom.dcmread(broken)
    del dataset.StudyDate
    dataset.save_as(broken)
    orthanc.session.delete(f"{orthanc.url}/instances/{ids[4]}").raise_for_status()
    assert orthanc.post("/instances", broken.read_bytes())["ID"] == ids[4]
    high = Queue("high", connection=connection)
    first, second = _enqueue(high, ids[:4]), _enqueue(high, ids[4:])
    SimpleWorker([high], connection=connection).work(burst=True)
    assert first.get_status(refresh=True) == JobStatus.FINISHED
    assert second.get_status(refresh=True) == JobStatus.FAILED
    error = second.latest_result().exc_string
    assert "1 of 4 instance(s) failed" in error and ids[4] in error and "StudyDate" in error
    assert sorted(second.get_meta(refresh=True)["chrisDone"]) == sorted(ids[5:])
    orthanc.session.delete(f"{orthanc.url}/instances/{ids[4]}").raise_for_status()
    orthanc.post("/instances", files[4].read_bytes())
    runtime.current_runtime().cache.instance(ids[4]).unlink()   # the cached copy is the broken one
    FailedJobRegistry(queue=high).requeue(second.id)
    SimpleWorker([high], connection=connection).work(burst=True)
    assert second.get_status(refresh=True) == JobStatus.FINISHED
    assert second.return_value()["skipped"] == 3 and second.return_value()["registered"] == 1
    posts = [r for r in _posts(cube) if r.status == 201]
    assert len(posts) == 8 and len({r.body["path"] for r in posts}) == 8


def test_a_worker_that_takes_the_job_meanwhile_waits_for_what_was_begun_and_sends_it_no_more(
        lone_worker, connection, stored, sag_anon, tmp_path):
    """The race CI met: a worker alone on the queue begins the next job's first instance; a
    second worker comes up before the first one's job ends and takes that next job. It must
    take the early instance's outcome, not register it a second time."""
    worker_runtime, cube = lone_worker
    ids, files = stored
    held = cube.hold(pydicom.dcmread(files[3], stop_before_pixels=True).SOPInstanceUID)  # ends the first job
    early_sop = pydicom.dcmread(files[4], stop_before_pixels=True).SOPInstanceUID
    high = Queue("high", connection=connection)
    first, second = _enqueue(high, ids[:4]), _enqueue(high, ids[4:])
    env = {**os.environ, **worker_runtime.settings.config, "DICOMFLOW_CONFIG": "",
           "DICOMFLOW_SERVICES_DIR": str(REPO / "services"), "DICOMFLOW_HOME": str(tmp_path / "home-other"),
           "PYTHONPATH": str(REPO)}
    other: list[subprocess.CompletedProcess] = []

    def second_worker() -> None:
        try:
            wait_for(lambda: any(early_sop in r.body["path"] for r in _posts(cube)), timeout=30,
                     what="the second job's first instance, begun early, to reach CUBE")
            other.append(subprocess.run([sys.executable, "-m", "worker.cli", "--burst", "--name", "other"],
                                        env=env, cwd=REPO, capture_output=True, text=True, timeout=120))
        finally:
            held.set()

    director = threading.Thread(target=second_worker)
    director.start()
    SimpleWorker([high], connection=connection, name="lone").work(burst=True)
    director.join(150)
    assert other and other[0].returncode == 0, other[0].stderr[-3000:] if other else "no second worker"
    assert first.get_status(refresh=True) == second.get_status(refresh=True) == JobStatus.FINISHED
    assert Job.fetch(second.id, connection=connection).worker_name == "other", "the second worker ran the second job"
    posts = _posts(cube)
    assert len(posts) == 8 and {r.status for r in posts} == {201}, "each instance registered once"
    assert second.return_value()["registered"] == 4 and second.return_value()["stored"] == 4
    progress = series_progress(connection, AET, SAG_SERIES_UID)
    assert progress["stored"] == 8 and progress["registered"] == 8 and progress["errors"] == {}


@pytest.fixture()
def queued(connection):
    return Queue("high", connection=connection).enqueue("worker.runtime.run_service_job", jobName="x",
                                                       worker="chris.store", headers={}, params={},
                                                       added_params={}, event={})


def _as_another_process(monkeypatch) -> None:
    monkeypatch.setattr(ahead, "_NONCE", "another")


def test_a_claim_is_held_by_whoever_comes_first(connection, queued, monkeypatch):
    early = ahead.Claim(connection, queued).take(["a"])
    assert early.mine and early.begun == {"a": None}
    _as_another_process(monkeypatch)
    started = ahead.Claim(connection, queued).take()
    assert not started.mine and started.begun == {"a": None}, "the job's worker sees what was begun for it"
    assert not ahead.Claim(connection, queued).take(["b"]).mine
    assert ahead.Claim(connection, queued).wait("a", timeout=0.05) is None, "nothing recorded yet"
    monkeypatch.undo()
    ahead.Claim(connection, queued).record("a", {"result": {"registered": True}})
    _as_another_process(monkeypatch)
    assert ahead.Claim(connection, queued).wait("a", timeout=1) == {"result": {"registered": True}}
    assert ahead.Claim(connection, queued).take().begun == {"a": {"result": {"registered": True}}}


def test_a_job_that_started_first_cannot_be_begun_early(connection, queued, monkeypatch):
    assert ahead.Claim(connection, queued).take().mine
    _as_another_process(monkeypatch)
    late = ahead.Claim(connection, queued).take(["a"])
    assert not late.mine and late.begun == {}, "nothing marked as begun"


def test_a_run_queued_again_has_a_claim_of_its_own(connection, queued, monkeypatch):
    assert ahead.Claim(connection, queued).take(["a"]).mine
    Queue("high", connection=connection).enqueue_job(Job.fetch(queued.id, connection=connection))
    again = Job.fetch(queued.id, connection=connection)
    _as_another_process(monkeypatch)
    assert again.enqueued_at != queued.enqueued_at
    claimed = ahead.Claim(connection, again).take()
    assert claimed.mine and claimed.begun == {}
