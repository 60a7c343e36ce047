"""Workers on two other hosts (network namespaces joined by veth pairs): jobs spread over both,
each host fetches a file from Orthanc at most once, and a host cut off mid-job has its started
jobs re-run by the other within the reaper's bound (worker/liveness.py).

The main side (this namespace) runs Orthanc with the plugin and the scheduler; Redis requires a
password and listens on loopback and the two link addresses only; Orthanc answers other hosts
with its password (1.10 cannot bind to one address). Each host has its own state folder and
its own copy of the services: nothing is shared with the main host but the network.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import redis
from rq.job import Job

from tests.support import netns
from tests.support.orthanc import write_series
from tests.support.procs import wait_for
from tests.support.remote_workers import ProtectedRedis, fetches, open_to_hosts, start_workers, worker_env
from tests.support.services import job, make_service
from tests.support.stack import Pipeline, diagnostics

pytestmark = pytest.mark.skipif(bool(netns.unavailable()), reason=str(netns.unavailable()))

#: DICOMFLOW_JOB_HEARTBEAT_TTL for the hosts' workers (the smallest allowed): a cut-off host's
#: started jobs are queued again within TTL + TTL / 4 seconds.
TTL = 4

HOST_WORKER = '''
import json, time
import pydicom
from rq import get_current_job

def worker(jobName, headers, params, added_params, dcmpath=None, connection=None, **kwargs):
    job = get_current_job()
    sop = str(pydicom.dcmread(dcmpath, stop_before_pixels=True).SOPInstanceUID)
    assert sop == headers["SOPInstanceUID"]
    record = {"job": jobName, "id": job.id, "sop": sop, "worker": job.worker_name}
    connection.rpush("hosts:log", json.dumps({**record, "what": "start", "at": time.time()}))
    time.sleep(float(connection.get("hosts:sleep") or 0))
    connection.rpush("hosts:log", json.dumps({**record, "what": "end", "at": time.time()}))
'''


def log(client: redis.Redis) -> list[dict]:
    return [json.loads(e) for e in client.lrange("hosts:log", 0, -1)]


def ends(client: redis.Redis, sops: set[str]) -> list[dict]:
    return [e for e in log(client) if e["what"] == "end" and e["sop"] in sops]


def sops_of(files: list[Path]) -> set[str]:
    import pydicom
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def test_workers_on_two_hosts_share_the_jobs_fetch_once_and_take_over_a_cut_off_host(tmp_path):
    services = tmp_path / "services"
    make_service(services, "first", job("firstJob", "first", sortPosition=1), worker_code=HOST_WORKER)
    make_service(services, "second", job("secondJob", "second", sortPosition=2, dependsOn="firstJob"),
                 worker_code=HOST_WORKER)
    with netns.HostNetwork(tmp_path / "hosts", count=2) as network:
        a, b = network.hosts
        store = ProtectedRedis(tmp_path / "redis", [a.main_address, b.main_address])
        client = redis.Redis.from_url(store.url("127.0.0.1"))
        try:
            stack = Pipeline(tmp_path / "main", store.url("127.0.0.1"), services, workers=0)
            open_to_hosts(stack.orthanc, tmp_path)  # before its Orthanc starts
            with stack:
                names = {}
                for host in (a, b):
                    env = worker_env(host, store.url(host.main_address),
                                     f"http://{host.main_address}:{stack.orthanc.http_port}", stack.orthanc,
                                     services, DICOMFLOW_JOB_HEARTBEAT_TTL=str(TTL),
                                     DICOMFLOW_ORTHANC_RETRY_SECONDS="5")
                    names[host.address] = set(start_workers(host, env, 2))
                host_of = {name: address for address, group in names.items() for name in group}

                # 1. A series' jobs spread over both hosts; each host fetches each file at most once.
                client.set("hosts:sleep", 0.2)
                first = write_series(tmp_path / "first", 16)
                first_sops = sops_of(first)
                stack.orthanc.store(first, aet="SCALE")
                wait_for(lambda: len(ends(client, first_sops)) >= 2 * len(first), timeout=90,
                         what=f"{2 * len(first)} jobs on the two hosts\n{diagnostics(stack)}")
                done = ends(client, first_sops)
                assert Counter((e["job"], e["sop"]) for e in done) == {
                    (name, sop): 1 for sop in first_sops for name in ("firstJob", "secondJob")}
                by_host = Counter(host_of[e["worker"]] for e in done)
                assert set(by_host) == {a.address, b.address}, f"jobs did not spread over both hosts: {by_host}"
                fetched = fetches(stack.orthanc)
                assert fetched, f"no file fetch in Orthanc's log:\n{stack.orthanc.log_tail()}"
                assert max(fetched.values()) == 1, f"a host fetched a file twice: {fetched.most_common(3)}"
                assert {ip for ip, _ in fetched} <= {a.address, b.address}, "a fetch came from elsewhere"
                assert len({instance for _, instance in fetched}) == len(first)

                # 2. Host a goes off the network in the middle of its jobs.
                client.set("hosts:sleep", 1.5)
                second = write_series(tmp_path / "second", 6)
                second_sops = sops_of(second)
                stack.orthanc.store(second, aet="SCALE")

                def running_on_a() -> list[dict]:
                    return [e for e in log(client) if e["sop"] in second_sops and e["what"] == "start"
                            and host_of[e["worker"]] == a.address]
                started_on_a = wait_for(running_on_a, timeout=60, interval=0.02,
                                        what="a job of the second series started on host a")
                a.cut()
                cut_at = time.time()
                abandoned = {e["id"] for e in running_on_a()
                             if not any(x["id"] == e["id"] and x["what"] == "end" for x in log(client))}
                assert abandoned, f"host a's jobs all ended before the cut: {started_on_a}"

                requeued_at: dict[str, float] = {}

                def all_requeued() -> bool:
                    for job_id in abandoned - set(requeued_at):
                        if Job.fetch(job_id, connection=client).meta.get("requeuedAfterWorkerDied"):
                            requeued_at[job_id] = time.time()
                    return len(requeued_at) == len(abandoned)
                wait_for(all_requeued, timeout=3 * TTL, interval=0.1, what="host a's started jobs queued again")
                bound = TTL + TTL / 4
                slowest = max(requeued_at.values()) - cut_at
                assert slowest <= bound + 1.0, f"queued again after {slowest:.1f} s, more than TTL + TTL/4 = {bound} s"

                wait_for(lambda: len(ends(client, second_sops)) >= 2 * len(second), timeout=90,
                         what=f"the second series' {2 * len(second)} jobs\n{diagnostics(stack)}")
                done = ends(client, second_sops)
                # Nothing lost, nothing completed twice (host a never reached Redis again).
                assert Counter((e["job"], e["sop"]) for e in done) == {
                    (name, sop): 1 for sop in second_sops for name in ("firstJob", "secondJob")}
                finished_by = {e["id"]: host_of[e["worker"]] for e in done}
                assert all(finished_by[job_id] == b.address for job_id in abandoned)
                assert not any(host_of[e["worker"]] == a.address and e["at"] > cut_at + 0.5 for e in done)
                per_host = defaultdict(int)
                for (ip, _), count in fetches(stack.orthanc).items():
                    per_host[ip] = max(per_host[ip], count)
                assert max(per_host.values()) == 1, f"a host fetched a file twice: {dict(per_host)}"
        finally:
            network.close()
            store.stop()
        assert not network.leftovers(), f"namespaces or links left: {network.leftovers()}"
