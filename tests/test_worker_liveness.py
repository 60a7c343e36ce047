"""A job whose worker dies is run again, and its dependents follow (issue 16, case 5).

Real worker processes (`python -m worker.cli`), a real SIGKILL, a real Redis; the heartbeat
TTL is shortened to 4 s so the bound (ttl + ttl/4) is quick to reach.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from rq import Queue
from rq.job import Job, JobStatus

from tests.conftest import REPO
from tests.support.procs import wait_for
from tests.support.services import job, make_service
from tests.test_execution import instance_event, log_entries, submit  # noqa: F401 - fixture

TTL = 4


@pytest.fixture()
def start_worker(tmp_path, redis_url, services):
    procs: list[subprocess.Popen] = []

    def start(name: str, worker_class: str = "simple") -> subprocess.Popen:
        env = {**os.environ, "DICOMFLOW_REDIS_URL": redis_url, "DICOMFLOW_SERVICES_DIR": str(services),
               "DICOMFLOW_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO),
               "DICOMFLOW_JOB_HEARTBEAT_TTL": str(TTL), "DICOMFLOW_CONFIG": ""}
        log = open(tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "--name", name, "--worker-class", worker_class],
                                env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc
    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(p) for p in handle.read().split()]


@pytest.mark.parametrize("worker_class", ["simple", "fork"])
def test_a_job_whose_worker_is_killed_runs_again_and_its_dependents_follow(
        services, submit, start_worker, connection, worker_class):  # noqa: F811 - the imported fixture
    make_service(services, "slow", job("slowJob", "slow", sortPosition=1, params={"sleep": 3 * TTL}))
    make_service(services, "after", job("afterJob", "after", sortPosition=2, dependsOn="slowJob"))
    (result,) = submit(instance_event("5.1"))
    slow_id, after_id = result["jobs"]["slowJob"], result["jobs"]["afterJob"]
    doomed = start_worker("doomed", worker_class)
    wait_for(lambda: Job.fetch(slow_id, connection=connection).get_status() == JobStatus.STARTED, timeout=30,
             what="the slow job to start")
    # Long past one heartbeat period, the running job's registry entry is still in the future.
    time.sleep(TTL / 2)
    assert connection.zscore(f"rq:wip:{Queue('default', connection=connection).name}",
                             next(m.decode() for m in connection.zrange("rq:wip:default", 0, -1))) > time.time()
    # The worker and, forking, the child running the job (RQ puts it in a session of its own).
    for pid in [doomed.pid, *_children(doomed.pid)]:
        os.kill(pid, signal.SIGKILL)
    doomed.wait(10)
    killed_at = time.monotonic()
    start_worker("survivor", worker_class)
    wait_for(lambda: Job.fetch(slow_id, connection=connection).meta.get("requeuedAfterWorkerDied") == 1,
             timeout=TTL * 3, what="the dead worker's job to be queued again")
    requeued_after = time.monotonic() - killed_at
    assert requeued_after <= TTL + TTL / 4 + 2, requeued_after
    wait_for(lambda: Job.fetch(after_id, connection=connection).get_status() == JobStatus.FINISHED,
             timeout=60, what="the dependent job to finish")
    entries = [(e["job"], e["what"]) for e in log_entries(connection)]
    assert entries.count(("slowJob", "start")) == 2 and entries.count(("slowJob", "end")) == 1
    assert entries[-2:] == [("afterJob", "start"), ("afterJob", "end")]
    assert Job.fetch(slow_id, connection=connection).get_status() == JobStatus.FINISHED


def test_a_job_that_kills_every_worker_fails_after_a_few_tries(connection):
    """`requeue_abandoned` itself: the fourth death fails the job, with a message that says why."""
    from worker.liveness import MAX_REQUEUES, requeue_abandoned

    queue = Queue("default", connection=connection)
    doomed = queue.enqueue("builtins.print", job_id="dies-every-time")
    registry_key = "rq:wip:default"
    for attempt in range(1, MAX_REQUEUES + 2):
        connection.lrem(queue.key, 0, doomed.id)
        doomed.set_status(JobStatus.STARTED)
        connection.zadd(registry_key, {f"{doomed.id}:exec{attempt}": time.time() - 1})
        assert requeue_abandoned(connection, ["default"]) == [doomed.id]
        assert requeue_abandoned(connection, ["default"]) == [], "each death is handled once"
    job_now = Job.fetch(doomed.id, connection=connection)
    assert job_now.get_status() == JobStatus.FAILED
    assert "died 4 times" in job_now.latest_result().exc_string
    assert doomed.id in queue.failed_job_registry.get_job_ids()
