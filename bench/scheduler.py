"""Events per second through the scheduler into Redis (real Redis, no Orthanc).

Side by side in one run:
  rq-baseline   RQ's own enqueue_many of the same jobs (no planning, no idempotency)
  enqueuer      dicomflow's planning + idempotency + one transaction per batch
  http          the same through the real scheduler (gunicorn) over HTTP, batches of B
  worker-*      trivial jobs drained by one SimpleWorker vs one forking Worker

Every event is one the plugin builds (orthanc/dicomflow_events.py) from a generated CT
file: the plugin's default tags, Orthanc's ids, calling and called AE titles, IP, transfer
syntax. Over HTTP it also prints the CPU per event of the scheduler's processes and of
redis-server (which keeps an append-only file, as run.sh's does): what the pipeline costs
the host per stored instance, apart from Orthanc.

Run: .venv/bin/python -m bench.scheduler [--events 5000] [--batch 350]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis
import redis.utils
import requests
from rq import Queue, SimpleWorker, Worker

from bench.support import best_rate, cpu_seconds, private_redis
from dicomflow import dicomheader
from dicomflow.events import Event
from scheduler.enqueue import Enqueuer
from scheduler.registry import RegistryHolder
from tests.support.orthanc import write_series
from tests.support.procs import free_port, wait_for
from tests.support.services import settings_for

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "orthanc"))
from dicomflow_events import EventBuilder, orthanc_id  # noqa: E402 - the plugin's own module, stdlib only

#: Not the plugin's default list (orthanc/dicomflow_settings.py's DEFAULT_TAGS): every keyword the
#: raw reader knows but the character set.
TAGS = tuple(k for k in dicomheader.KEYWORDS if k != "SpecificCharacterSet")


def plugin_events(folder: Path) -> Callable[[int], dict]:
    """`event(n)`: the n-th distinct instance event, as the plugin builds it from a generated CT file."""
    path = write_series(folder, 1, rows=64, columns=64, patient_id="BENCHSCHED")[0]
    data = path.read_bytes()
    builder = EventBuilder(dicomheader, TAGS, 256)
    _, dataset = builder.read(data)
    uids = [dataset[k] for k in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
    template = json.loads(builder.build(orthanc_id(*uids), data, True, "STORESCU", "127.0.0.1", "DICOMFLOW",
                                       None, time.time()))
    assert len(template["headers"]) >= 20, template["headers"]  # what bench.ingest's files carry

    def event(n: int) -> dict:
        sop = f"{uids[3]}.{n}"
        return {**template, "headers": {**template["headers"], "SOPInstanceUID": sop, "InstanceNumber": str(n)},
                "orthanc": {**template["orthanc"], "instance": orthanc_id(*uids[:3], sop)},
                "receivedAt": time.time()}
    return event


def trivial(**kwargs):
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=350,
                        help="events per batch (the plugin's, 0.5 s of ingest at ~700 instances/s)")
    parser.add_argument("--worker-jobs", type=int, default=500)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dicomflow-bench-"))
    services = tmp / "services"
    # The two example services, as bench.ingest's (c): tempJob, and tempFollowJob depending on it.
    for name in ("temp", "tempfollow"):
        shutil.copytree(REPO / "examples" / name / "registry", services / "registry" / name)
        shutil.copytree(REPO / "examples" / name / "module", services / "modules" / name)
    event = plugin_events(tmp / "dicom")
    figures: dict[str, float] = {}
    redis_pids: list[int] = []
    with private_redis(redis_pids, aof=True) as url:
        conn = redis.Redis.from_url(url)
        settings = settings_for(tmp, url, services)
        holder = RegistryHolder(services / "registry", settings.queues, settings.config)
        enqueuer = Enqueuer(conn, settings)
        counter = iter(range(10**9))

        def batches():
            for start in range(0, args.events, args.batch):
                yield [event(next(counter)) for _ in range(min(args.batch, args.events - start))]

        def run_baseline() -> int:
            conn.flushall()
            q = Queue("default", connection=conn)
            for batch in batches():
                datas = [Queue.prepare_data("bench.scheduler.trivial", kwargs=e) for e in batch]
                jobs = q.enqueue_many(datas)
                q.enqueue_many([Queue.prepare_data("bench.scheduler.trivial", kwargs=e, depends_on=j)
                                for e, j in zip(batch, jobs)])
            return args.events

        def run_enqueuer() -> int:
            conn.flushall()
            for batch in batches():
                results = enqueuer.submit([Event.model_validate(e) for e in batch], holder.current())
                assert all(r.status == "scheduled" for r in results)
            return args.events

        figures["rq-baseline"], _ = best_rate(run_baseline)
        figures["enqueuer"], _ = best_rate(run_enqueuer)
        # CPU time of this process per event: steadier than wall time on a shared machine.
        cpu = []
        for _ in range(3):
            start = time.process_time()
            run_enqueuer()
            cpu.append((time.process_time() - start) / args.events)
        cpu_per_event = sorted(cpu)[1]

        # Over HTTP, through the production server.
        port = free_port()
        env = {**os.environ, "DICOMFLOW_REDIS_URL": url, "DICOMFLOW_SERVICES_DIR": str(services),
               "DICOMFLOW_HOME": str(tmp / "home"), "DICOMFLOW_SCHEDULER_TOKEN": "bench",
               "DICOMFLOW_SCHEDULER_PORT": str(port), "DICOMFLOW_CONFIG": ""}
        server = subprocess.Popen([sys.executable, "-m", "scheduler.cli"], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            session = requests.Session()
            base = f"http://127.0.0.1:{port}"
            wait_for(lambda: _ok(session, base + "/health"), timeout=30, what="scheduler")

            def run_http() -> int:
                conn.flushall()
                for batch in batches():
                    r = session.post(base + "/api/v1/events", json={"events": batch},
                                     headers={"Authorization": "Bearer bench"})
                    r.raise_for_status()
                return args.events
            scheduler_cpu, redis_cpu = cpu_seconds(server.pid), cpu_seconds(*redis_pids)
            figures["http"], _ = best_rate(run_http)
            http_events = 3 * args.events  # best_rate's repeats
            scheduler_cpu = (cpu_seconds(server.pid) - scheduler_cpu) / http_events
            redis_cpu = (cpu_seconds(*redis_pids) - redis_cpu) / http_events
        finally:
            server.terminate()
            server.wait(10)

        # Worker classes: trivial jobs, one worker each.
        for name, cls in (("worker-simple", SimpleWorker), ("worker-fork", Worker)):
            conn.flushall()
            q = Queue("default", connection=conn)
            q.enqueue_many([Queue.prepare_data("bench.scheduler.trivial") for _ in range(args.worker_jobs)])
            start = time.perf_counter()
            cls(["default"], connection=conn).work(burst=True, logging_level="WARNING")
            figures[name] = args.worker_jobs / (time.perf_counter() - start)

    print(f"scheduler benchmark: {args.events} instance events as the plugin sends them, batches of "
          f"{args.batch}, the two example services (2 jobs per event, one depends on the other), "
          "real redis-server with an append-only file")
    for name, rate in figures.items():
        unit = "jobs/s" if name.startswith("worker") else "events/s"
        print(f"  {name:<12} {rate:9.0f} {unit}")
    print(f"  enqueuer CPU per event       {cpu_per_event * 1000:.3f} ms (redis-py parser: "
          f"{'hiredis' if redis.utils.HIREDIS_AVAILABLE else 'pure Python'})")
    print(f"  over HTTP, CPU per event: scheduler (gunicorn) {scheduler_cpu * 1000:.3f} ms, "
          f"redis-server {redis_cpu * 1000:.3f} ms")
    print(f"  ratio enqueuer/rq-baseline   {figures['enqueuer'] / figures['rq-baseline']:.2f}")
    print(f"  ratio http/enqueuer          {figures['http'] / figures['enqueuer']:.2f}")
    print(f"  ratio simple/fork workers    {figures['worker-simple'] / figures['worker-fork']:.2f}")


def _ok(session, url) -> bool:
    try:
        return session.get(url, timeout=1).ok
    except requests.RequestException:
        return False


if __name__ == "__main__":
    main()
