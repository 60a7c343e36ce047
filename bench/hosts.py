"""Workers on other hosts: jobs/s with workers on one vs two stand-in hosts (network namespaces).

As tests/test_scale_hosts.py sets it up (needs root): Orthanc with the plugin and the scheduler
on the main side, a password-protected Redis on the veth addresses, `dicomflow-worker`
processes in network namespaces with their own state folders. Each round sends a new series
with no worker running (a backlog of N instance jobs that read their file with pydicom), then
starts W workers on each of the first H hosts and times the first job's start to the last
job's end; the workers stop before the next round. Also prints Orthanc's file fetches per
host (each host fetches a file once; the cache is per host).

    .venv/bin/python -m bench.hosts --instances 300 --workers 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import redis

from tests.support import netns
from tests.support.orthanc import write_series
from tests.support.procs import wait_for
from tests.support.remote_workers import ProtectedRedis, fetches, open_to_hosts, start_workers, worker_env
from tests.support.services import job, make_service
from tests.support.stack import Pipeline

READ_WORKER = '''
import json, time
import pydicom
from rq import get_current_job

def worker(jobName, headers, params, added_params, dcmpath=None, connection=None, **kwargs):
    start = time.time()
    pydicom.dcmread(dcmpath)
    connection.rpush("bench:log", json.dumps({"worker": get_current_job().worker_name, "start": start,
                                              "end": time.time()}))
'''


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hosts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=300, help="jobs per round [300]")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per host [1]")
    options = parser.parse_args(args)
    reason = netns.unavailable()
    if reason:
        print(f"bench.hosts: {reason}", file=sys.stderr)
        return 1
    rates: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="dicomflow-bench-hosts-") as tmp:
        root = Path(tmp)
        services = root / "services"
        make_service(services, "read", job("readJob", "read"), worker_code=READ_WORKER)
        with netns.HostNetwork(root / "hosts", count=2) as network:
            store = ProtectedRedis(root / "redis", [h.main_address for h in network.hosts])
            client = redis.Redis.from_url(store.url("127.0.0.1"))
            try:
                stack = Pipeline(root / "main", store.url("127.0.0.1"), services, workers=0)
                open_to_hosts(stack.orthanc, root)
                with stack:
                    for hosts in (1, 2):
                        client.delete("bench:log")
                        files = write_series(root / f"round-{hosts}", options.instances, patient_id=f"HOSTS{hosts}")
                        stack.orthanc.store(files, aet="BENCH")
                        for host in network.hosts[:hosts]:
                            env = worker_env(host, store.url(host.main_address),
                                             f"http://{host.main_address}:{stack.orthanc.http_port}",
                                             stack.orthanc, services)
                            start_workers(host, env, options.workers)
                        wait_for(lambda: client.llen("bench:log") >= options.instances, timeout=600,
                                 what=f"{options.instances} jobs")
                        log = [json.loads(e) for e in client.lrange("bench:log", 0, -1)]
                        span = max(e["end"] for e in log) - min(e["start"] for e in log)
                        rates[hosts] = len(log) / span
                        by_host = Counter(e["worker"].rsplit("-w", 1)[0][-1] for e in log)
                        print(f"{hosts} host(s) x {options.workers} worker(s): {rates[hosts]:.0f} jobs/s "
                              f"(jobs per host {dict(by_host)})", flush=True)
                        for host in network.hosts[:hosts]:
                            host.stop()
                            host.procs.clear()
                    per_file = Counter(fetches(stack.orthanc).values())
            finally:
                network.close()
                store.stop()
    print(f"file fetches from Orthanc per (host, file): {dict(per_file)} (1: each host fetched each file once)")
    print(f"two hosts / one host: {rates[2] / rates[1]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
