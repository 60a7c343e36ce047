"""Two scheduler processes on one Redis: the same batch posted to both at the same moment is
planned once (scheduler/scripts.py's claim), and a series push completes once although both
schedulers look for due pushes.

What the plugin does with several scheduler URLs (or a round-robin in front of them) comes down
to this: a batch may reach both, e.g. when an answer is lost and the plugin re-sends it to the
other. The one that loses the claim answers 503 "busy"; the plugin's retry then gets "known".
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import redis
import requests
from rq import Queue
from rq.job import Job

from tests.support.procs import free_port, wait_for
from tests.support.services import job, make_service

REPO = Path(__file__).resolve().parent.parent
TOKEN = "two-schedulers"
ROUNDS = 12
BATCH = 40


def start_scheduler(folder: Path, redis_url: str, services: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("DICOMFLOW_", "ORTHANC_"))},
           "DICOMFLOW_CONFIG": "", "DICOMFLOW_REDIS_URL": redis_url, "DICOMFLOW_SERVICES_DIR": str(services),
           "DICOMFLOW_HOME": str(folder), "DICOMFLOW_SCHEDULER_TOKEN": TOKEN, "DICOMFLOW_SCHEDULER_PORT": str(port),
           "ORTHANC_STABLE_AGE": "1", "DICOMFLOW_PUSH_POLL": "0.1", "PYTHONPATH": str(REPO)}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "scheduler.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scheduler.cli", "--threads", "4"], env=env, cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError((folder / "scheduler.log").read_text()[-3000:])
        try:
            return requests.get(url + "/health", timeout=1).ok
        except requests.RequestException:
            return False
    wait_for(up, timeout=30, what=f"the scheduler in {folder}")
    return proc, url


def batch(round_number: int) -> list[dict]:
    """BATCH instance events of one series, as the plugin sends them (Orthanc ids, receivedAt)."""
    events = []
    for n in range(BATCH):
        sop = f"1.2.826.0.1.3680043.22.{round_number}.{n}"
        digest = hashlib.sha1(sop.encode()).hexdigest()
        events.append({"level": "instance", "remoteAet": "SCALE", "receivedAt": 1_700_000_000 + round_number + n / 1000,
                       "headers": {"SOPInstanceUID": sop, "SeriesInstanceUID": f"1.2.826.0.1.3680043.22.{round_number}",
                                   "StudyInstanceUID": "1.2.826.0.1.3680043.22", "PatientID": "SCALE"},
                       "orthanc": {"instance": "-".join(digest[i:i + 8] for i in range(0, 40, 8))}})
    return events


def post_until_accepted(url: str, events: list[dict], start: threading.Barrier, answers: list) -> None:
    """POST once at the barrier, then again after a 503 "busy" as the plugin does."""
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {TOKEN}"
    start.wait()
    for _ in range(100):
        response = session.post(url + "/api/v1/events", json={"events": events}, timeout=30)
        answers.append((url, response.status_code))
        if response.status_code != 503:
            response.raise_for_status()
            answers.extend((url, r["status"], r["key"]) for r in response.json()["results"])
            return
        time.sleep(0.05)
    raise AssertionError(f"{url} kept answering 503")


def test_the_same_batch_posted_to_two_schedulers_at_once_is_planned_once(tmp_path, redis_url):
    connection = redis.Redis.from_url(redis_url)
    connection.flushall()
    services = tmp_path / "services"
    make_service(services, "each", job("eachInstance", "each"))
    make_service(services, "whole", job("wholeSeries", "whole", triggerLevel="series"))
    procs = []
    try:
        for name in ("one", "two"):
            proc, url = start_scheduler(tmp_path / name, redis_url, services)
            procs.append((proc, url))
        urls = [url for _, url in procs]
        answers: list = []
        started = time.perf_counter()
        for number in range(ROUNDS):
            events = batch(number)
            barrier = threading.Barrier(2)
            threads = [threading.Thread(target=post_until_accepted, args=(url, events, barrier, answers))
                       for url in urls]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        elapsed = time.perf_counter() - started
        results = [a for a in answers if len(a) == 3]
        scheduled = Counter(key for _, status, key in results if status == "scheduled")
        all_keys = {key for _, _, key in results}
        assert len(all_keys) == ROUNDS * BATCH
        assert scheduled == {key: 1 for key in all_keys}, "an event was planned twice, or not at all"
        assert {status for _, status, _ in results} <= {"scheduled", "known", "duplicate"}
        assert len(results) == 2 * ROUNDS * BATCH, "each scheduler answered every event of every batch"
        queue = Queue("default", connection=connection)
        instance_jobs = [jid for jid in queue.job_ids
                         if Job.fetch(jid, connection=connection).kwargs.get("jobName") == "eachInstance"]
        assert len(instance_jobs) == ROUNDS * BATCH

        # Each round's series became one push, completed once (ORTHANC_STABLE_AGE=1) by one of the two.
        def series_jobs() -> list[str]:
            return [jid for jid in queue.job_ids
                    if Job.fetch(jid, connection=connection).kwargs.get("jobName") == "wholeSeries"]
        wait_for(lambda: len(series_jobs()) >= ROUNDS, timeout=30, what=f"{ROUNDS} series jobs")
        time.sleep(1.0)  # a second firing would come within a few poll periods (0.1 s)
        assert len(series_jobs()) == ROUNDS
        busy = sum(1 for a in answers if len(a) == 2 and a[1] == 503)
        by_url = Counter(url for url, status, _ in results if status == "scheduled")
        print(f"\n{ROUNDS} batches of {BATCH} to both schedulers in {elapsed:.1f} s; {busy} answers 503 busy; "
              f"events planned per scheduler: {sorted(by_url.values())}")
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.wait(20)
