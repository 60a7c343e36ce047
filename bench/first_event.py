"""How late the first instance after an Orthanc start reaches the queue, against a warm one.

Starts the stack (Orthanc with the plugin, the scheduler with the built-in services, no
worker: the jobs stay queued), sends one sag-anon file with storescu, then three more a
second and a half apart, and reads when each file's job was enqueued (RQ's `enqueued_at`)
against when Orthanc received it (the event's `receivedAt`). A fresh stack per round; prints
the first file's latency, the warm files' median, and first / warm.

    .venv/bin/python -m bench.first_event --rounds 3
"""

from __future__ import annotations

import argparse
import calendar
import statistics
import tempfile
import time
from pathlib import Path

import redis
from rq.job import Job
from rq.queue import Queue

from tests.support.redis_server import start_redis_server, stop_redis_server
from tests.support.stack import REPO, Pipeline

SAG = REPO.parent / "shared" / "data" / "sag-anon"
#: The queue the ChRIS service's instance jobs go to (its settings.json).
QUEUE = "high"


def _seconds(moment) -> float:
    return calendar.timegm(moment.utctimetuple()) + moment.microsecond / 1e6


def latency(stack: Pipeline, connection: redis.Redis, path: Path) -> float:
    """Seconds from Orthanc receiving `path` to its job being enqueued."""
    queue = Queue(QUEUE, connection=connection)
    before = set(queue.job_ids)
    stack.orthanc.store([path])
    deadline = time.monotonic() + 30
    while not (new := [j for j in queue.job_ids if j not in before]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no job enqueued for {path.name}")
        time.sleep(0.005)
    job = Job.fetch(new[0], connection=connection)
    received = job.kwargs["batch"][0]["event"]["receivedAt"]
    return _seconds(job.enqueued_at) - received


def one_round(folder: Path, files: list[Path]) -> tuple[float, list[float]]:
    proc, url = start_redis_server(folder / "redis")
    connection = redis.Redis.from_url(url)
    config = {"CHRIS_URL": "http://127.0.0.1:9/api/v1/", "CHRIS_FILES_ROOT": str(folder / "cube"),
              "CHRIS_USERNAME": "chris", "CHRIS_PASSWORD": "unused", "CHRIS_REGISTRATION": "pacsfiles"}
    try:
        with Pipeline(folder / "stack", url, REPO / "services", workers=0, extra_config=config) as stack:
            time.sleep(2)   # Orthanc started and idle, as before a first study
            first = latency(stack, connection, files[0])
            warm = []
            for path in files[1:4]:
                time.sleep(1.5)   # a quiet spell: each is the first of its burst
                warm.append(latency(stack, connection, path))
    finally:
        stop_redis_server(proc)
    return first, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = sorted(SAG.glob("*.dcm"))
    firsts, warms = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            first, warm = one_round(Path(tmp) / f"round{n}", files)
            firsts.append(first)
            warms.extend(warm)
            print(f"round {n + 1}: first after the start {first * 1000:.0f} ms; warm "
                  + ", ".join(f"{w * 1000:.0f}" for w in warm) + " ms", flush=True)
    first, warm = statistics.median(firsts), statistics.median(warms)
    print(f"received -> enqueued, median: first instance after Orthanc's start {first * 1000:.0f} ms, "
          f"warm {warm * 1000:.0f} ms; first / warm {first / warm:.2f}")


if __name__ == "__main__":
    main()
