"""How many queued jobs one Redis holds per GB, and the scheduler's events/s per core.

Plans N instance events as the plugin builds them (bench/scheduler.py's: 24 tags, Orthanc's
ids, AE titles) through dicomflow's enqueuer into a private redis-server, with the two example
services (2 jobs per event, one depending on the other), no worker running: every job stays
queued or deferred, as in a backlog. Prints Redis's `used_memory` growth per event and per
job (everything a planned event leaves: the jobs, their run record, the push it opened),
the jobs one GB holds, and the enqueuer's CPU time per event (its events/s on one core).

    .venv/bin/python -m bench.redis_jobs --events 20000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import redis

from bench.scheduler import REPO, plugin_events
from bench.support import private_redis
from dicomflow.events import Event
from scheduler.enqueue import Enqueuer
from scheduler.registry import RegistryHolder
from tests.support.services import settings_for


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=350)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dicomflow-bench-jobs-"))
    try:
        services = tmp / "services"
        for name in ("temp", "tempfollow"):
            shutil.copytree(REPO / "examples" / name / "registry", services / "registry" / name)
            shutil.copytree(REPO / "examples" / name / "module", services / "modules" / name)
        event = plugin_events(tmp / "dicom")
        with private_redis() as url:
            conn = redis.Redis.from_url(url)
            settings = settings_for(tmp, url, services)
            holder = RegistryHolder(services / "registry", settings.queues, settings.config)
            enqueuer = Enqueuer(conn, settings)
            before = conn.info("memory")["used_memory"]
            cpu, jobs = 0.0, 0
            for start in range(0, args.events, args.batch):
                batch = [Event.model_validate(event(n)) for n in range(start, min(start + args.batch, args.events))]
                began = time.process_time()
                results = enqueuer.submit(batch, holder.current())
                cpu += time.process_time() - began
                assert all(r.status == "scheduled" for r in results)
                jobs += sum(len(r.jobs) for r in results)
            grown = conn.info("memory")["used_memory"] - before
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    per_job = grown / jobs
    print(f"{args.events} events planned, {jobs} jobs queued or deferred, Redis grew {grown / 2**20:.1f} MiB")
    print(f"  per event {grown / args.events:.0f} B, per job {per_job:.0f} B -> {2**30 / per_job:,.0f} jobs "
          f"({2**30 / (grown / args.events):,.0f} events of 2 jobs) per GiB")
    print(f"  enqueuer CPU {1000 * cpu / args.events:.3f} ms per event -> {args.events / cpu:,.0f} events/s per core "
          "(planning and the Redis client; redis-server's own CPU not counted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
