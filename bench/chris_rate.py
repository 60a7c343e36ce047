"""Benchmark: does the pipeline register into CUBE at the rate CUBE accepts? (issue 23)

Side by side in one run, for N = 1, 2, 4:
  direct    N client threads POST the 192 sag-anon files to CUBE's pacsfiles/ API themselves
            (token auth, files already in storage), three ways: a plain keep-alive session
            each, a new connection per request, and dicomflow's keep-alive session that ACKs
            at once (dicomflow/httpsession.py); CUBE's own rate is the best of the three.
  pipeline  the whole stack with N workers (real Orthanc + plugin, scheduler, worker processes,
            the built-in ChRIS service in pacsfiles mode): storescu sends the series, and the
            rate is 192 / (first instance sent -> last registration seen by CUBE).
The ratio pipeline / direct is the figure (target >= 0.8).

CUBE is the test double (tests/support/cube_double.py) in a process of its own, with CUBE 5's
cost: every registration burns `--cpu-ms` (16) of CPU under one lock, as CUBE 5's single
Django process does, so CUBE competes with the pipeline for this machine's cores as real CUBE
did when the issue was measured.
Usage: .venv/bin/python -m bench.chris_rate [--rounds 3] [--workers 1,2,4] [--cpu-ms 16] [--no-nagle]
       [--pin-cube] [--verbose] [--config KEY=VALUE]
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import redis
import requests
from pydicom.uid import generate_uid
from rq.job import Job
from rq.registry import FinishedJobRegistry

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.chris import start_redis  # noqa: E402
from dicomflow import httpsession  # noqa: E402
from dicomflow.chris.instance import read_instance_tags  # noqa: E402
from dicomflow.chris.metadata import registration_fields  # noqa: E402
from dicomflow.chris.paths import instance_path  # noqa: E402
from dicomflow.chris.store import write_file  # noqa: E402
from tests.support.cube_double import CubeDouble  # noqa: E402
from tests.support.procs import wait_for  # noqa: E402
from tests.support.stack import Pipeline  # noqa: E402

SAG = REPO.parent / "shared" / "data" / "sag-anon"
VERBOSE = False
#: CPU ms per instance of each part of the stack, per pipeline run.
CPU: dict[str, list[float]] = {}


def _serve_cube(conn, files_root: str, cpu_cost: float, nagle: bool) -> None:
    """The double in this child process; answers (count, first, last) of a pacs' registrations."""
    # cube6 offers both APIs: the stacks choose with CHRIS_REGISTRATION.
    double = CubeDouble(Path(files_root), mode="cube6", basic_cost=0.0, write_cost=0.0, cpu_cost=cpu_cost,
                        nagle=nagle).start()
    conn.send(double.url)
    while True:
        message = conn.recv()
        if message == "stop":
            double.stop()
            return
        pacs, everything = message if isinstance(message, tuple) else (message, False)
        mine = [r for r in double.registrations() if r.status == 201 and isinstance(r.body, dict)
                and r.body.get("pacs_name") == pacs]
        times = [r.at for r in mine]
        if everything == "arrivals":
            conn.send(sorted((r.arrived, r.at) for r in mine))
        else:
            conn.send(sorted(times) if everything else (len(times), min(times, default=None), max(times, default=None)))


class Cube:
    """The double in a child process."""

    def __init__(self, files_root: Path, cpu_cost: float, nagle: bool = True):
        self._conn, child = multiprocessing.Pipe()
        self._proc = multiprocessing.get_context("spawn").Process(
            target=_serve_cube, args=(child, str(files_root), cpu_cost, nagle), daemon=True)
        self._proc.start()
        self.pid = self._proc.pid
        self.url = self._conn.recv()

    def registered(self, pacs: str) -> tuple[int, float | None, float | None]:
        self._conn.send(pacs)
        return self._conn.recv()

    def times(self, pacs: str) -> list[float]:
        """When each of a pacs' registrations was answered, in order."""
        self._conn.send((pacs, True))
        return self._conn.recv()

    def arrivals(self, pacs: str) -> list[tuple[float, float]]:
        """(came in, answered) of each of a pacs' registrations, in order."""
        self._conn.send((pacs, "arrivals"))
        return self._conn.recv()

    def stop(self) -> None:
        self._conn.send("stop")
        self._proc.join(10)


def token(url: str) -> str:
    return requests.post(url + "auth-token/", json={"username": "chris", "password": "chris1234"},
                         timeout=30).json()["token"]


#: How a direct client talks to CUBE: a session per thread, or a new connection per request.
CLIENTS = {"keep-alive": requests.Session, "new connection": None, "dicomflow's": httpsession.session}


def direct(cube: Cube, files: list[Path], root: Path, pacs: str, clients: int, how: str) -> float:
    """CUBE's own rate: `clients` threads POST every file's registration, as `how` says; files/s."""
    bodies = []
    for path in files:
        tags = read_instance_tags(path)
        location = instance_path(tags, pacs)
        write_file(path, root, location.path)
        bodies.append({**registration_fields(tags, location.pacs_name), "path": location.path})
    headers = {"Authorization": f"Token {token(cube.url)}", "Accept": "application/json"}
    chunks = [bodies[i::clients] for i in range(clients)]
    failures: list[int] = []

    def post(chunk: list[dict]) -> None:
        make = CLIENTS[how]
        with (make() if make else contextlib.nullcontext(requests)) as session:
            for body in chunk:
                status = session.post(cube.url + "pacsfiles/", json=body, headers=headers, timeout=60).status_code
                if status != 201:
                    failures.append(status)
    threads = [threading.Thread(target=post, args=(chunk,)) for chunk in chunks]
    start = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    count, _, last = cube.registered(pacs)
    assert count == len(files) and not failures, (count, failures[:5])
    return len(files) / (last - start)


def fresh_series(files: list[Path], folder: Path) -> Path:
    """A copy of the series with new Study/Series/SOP Instance UIDs: Orthanc stores it anew,
    as it would a series fresh from a modality (a re-sent one it already holds costs less)."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / path.name)
    return folder


def machine_idle() -> tuple[int, int]:
    """(all, idle + iowait) CPU ticks of the machine so far (/proc/stat)."""
    with open("/proc/stat") as handle:
        ticks = [int(v) for v in handle.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]


def busy(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the machine's CPU time that was used between two `machine_idle()` readings."""
    total = after[0] - before[0]
    return 1 - (after[1] - before[1]) / total if total else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its reaped children so far."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def with_children(pid: int) -> list[int]:
    """`pid` and its descendants (gunicorn serves from a child of its master)."""
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            for child in handle.read().split():
                pids += with_children(int(child))
    return pids


#: A --config key with this prefix is an option of the plugin (Orthanc's "Dicomflow" section).
PLUGIN_PREFIX = "Dicomflow."
#: The benchmark's redis-server (the job queue and the service's counters), whose CPU is counted too.
REDIS_PIDS: list[int] = []


def components(stack: Pipeline, cube: Cube) -> dict[str, list[int]]:
    """The processes of each part of the stack (and CUBE)."""
    return {"orthanc": with_children(stack.orthanc.proc.pid), "scheduler": with_children(stack.scheduler.pid),
            "workers": [w.pid for w in stack.workers], "redis": REDIS_PIDS, "cube": [cube.pid]}


def cpu_by_component(parts: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in parts.items()}


def pipeline(stack: Pipeline, cube: Cube, pacs: str, series: Path, count: int) -> float:
    """The stack's rate: storescu sends the series as AE `pacs`; files/s to the last registration."""
    parts = components(stack, cube)
    cpu_before = cpu_by_component(parts)
    idle_before = machine_idle()
    start = time.time()
    stack.orthanc.store([series], aet=pacs, pattern="*.dcm")
    sent = time.time() - start
    wait_for(lambda: cube.registered(pacs)[0] >= count, timeout=600, interval=0.1,
             what=f"{count} registrations from {pacs}")
    _, first, last = cube.registered(pacs)
    idle_after = machine_idle()
    cpu_after = cpu_by_component(parts)
    for name in parts:
        CPU.setdefault(name, []).append((cpu_after[name] - cpu_before[name]) / count * 1000)
    if VERBOSE:
        print(f"  {pacs}: sent in {sent:.1f} s, first registration after {first - start:.1f} s, "
              f"last after {last - start:.1f} s; CPU ms/instance: "
              + ", ".join(f"{name} {CPU[name][-1]:.1f}" for name in parts)
              + f"; the machine's cores {busy(idle_before, idle_after):.0%} busy", flush=True)
        times = cube.times(pacs)
        gaps = sorted((b - a) * 1000 for a, b in zip(times, times[1:]))
        if gaps:
            median = statistics.median(gaps)
            long = [g for g in gaps if g > 2 * median]
            print(f"    gaps between registrations: p50 {median:.1f} ms, p90 {gaps[len(gaps) * 9 // 10]:.1f} ms, "
                  f"max {gaps[-1]:.0f} ms; {len(long)} over twice the median, {sum(long) / 1000:.2f} s in all; "
                  f"registrations before the last instance was sent: {sum(t < start + sent for t in times)}",
                  flush=True)
        print("    " + job_boundaries(stack, cube.arrivals(pacs)), flush=True)
        print("    " + long_gaps(stack, times, 2 * median if gaps else 0.0), flush=True)
        print("    " + startup(stack, start, times), flush=True)
    return count / (last - start)


def pin_cube(pid: int) -> None:
    """CUBE's process (every thread) on core 0; this process, and so every process it starts
    from now on, on the others."""
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        raise SystemExit("--pin-cube needs at least two cores")
    first = min(cores)
    for thread in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(thread), {first})
    os.sched_setaffinity(0, cores - {first})


def _seconds(moment) -> float:
    """An RQ timestamp (UTC, naive or aware) as Unix time."""
    return calendar.timegm(moment.utctimetuple()) + moment.microsecond / 1e6


def job_boundaries(stack: Pipeline, arrivals: list[tuple[float, float]]) -> str:
    """Where the time between a job's last registration and the next job's first goes, per
    worker: from the job's last registration answered to its end (the job's and RQ's
    bookkeeping), from its end to the next job's start (RQ's cycle), and from that start to
    the next job's first registration reaching CUBE (its first instance's fetch and store)."""
    connection = redis.Redis.from_url(stack.env["DICOMFLOW_REDIS_URL"])
    registry = FinishedJobRegistry("high", connection=connection)
    times = sorted(at for _, at in arrivals)
    came = sorted(arrived for arrived, _ in arrivals)
    jobs = [job for job in Job.fetch_many(registry.get_job_ids(), connection=connection)
            if job is not None and job.started_at and job.ended_at and job.worker_name
            and _seconds(job.ended_at) >= times[0] - 5]
    connection.close()
    tails, cycles, heads = [], [], []
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for job in jobs:
        by_worker.setdefault(job.worker_name, []).append((_seconds(job.started_at), _seconds(job.ended_at)))
    for spans in by_worker.values():
        spans.sort()
        for (begin, end), (after, _) in zip(spans, spans[1:]):
            answered = [t for t in times if begin <= t <= end]
            arrived = [t for t in came if t >= after]
            if answered and arrived:
                tails.append((end - answered[-1]) * 1000)
                cycles.append((after - end) * 1000)
                heads.append((arrived[0] - after) * 1000)
    if not cycles:
        return f"jobs: {len(jobs)}"

    def p50(values: list[float]) -> str:
        return f"p50 {statistics.median(values):.1f} ms (max {max(values):.0f})"
    return (f"{len(jobs)} jobs; at a worker's job boundary: last registration answered -> job end "
            f"{p50(tails)}; -> next job start {p50(cycles)}; -> its first registration at CUBE {p50(heads)}")


def long_gaps(stack: Pipeline, times: list[float], threshold_ms: float) -> str:
    """What CUBE waited for in each gap between two registrations longer than `threshold_ms`:
    a job boundary (a job of the same worker ended and the next started inside the gap), work
    (the job that ended the gap was enqueued inside it: the workers had nothing queued), or
    neither (a pause inside a job: the CPU, the GIL, the worker's own steps)."""
    connection = redis.Redis.from_url(stack.env["DICOMFLOW_REDIS_URL"])
    registry = FinishedJobRegistry("high", connection=connection)
    jobs = [job for job in Job.fetch_many(registry.get_job_ids(), connection=connection)
            if job is not None and job.enqueued_at and job.started_at and job.ended_at]
    connection.close()
    spans = [(_seconds(j.enqueued_at), _seconds(j.started_at), _seconds(j.ended_at)) for j in jobs]
    kinds: dict[str, list[float]] = {"job boundary": [], "waiting for work": [], "inside a job": []}
    for before, after in zip(times, times[1:]):
        gap = (after - before) * 1000
        if gap <= threshold_ms:
            continue
        if any(before < started < after and before < enqueued for enqueued, started, _ in spans):
            kinds["waiting for work"].append(gap)
        elif any(before < started < after for _, started, _ in spans):
            kinds["job boundary"].append(gap)
        else:
            kinds["inside a job"].append(gap)
    return "long gaps: " + "; ".join(f"{kind} {len(g)} ({sum(g) / 1000:.2f} s)" for kind, g in kinds.items())


def startup(stack: Pipeline, start: float, times: list[float]) -> str:
    """Where the time before CUBE's first registration goes: storescu's start (its first instance
    received by Orthanc: the earliest `receivedAt` of the jobs' events), the plugin's and the
    scheduler's hand-over (the first job enqueued), RQ (it started), the job (its first registration)."""
    connection = redis.Redis.from_url(stack.env["DICOMFLOW_REDIS_URL"])
    registry = FinishedJobRegistry("high", connection=connection)
    jobs = [job for job in Job.fetch_many(registry.get_job_ids(), connection=connection)
            if job is not None and job.enqueued_at and job.started_at and _seconds(job.enqueued_at) >= start - 1]
    connection.close()
    received = [item["event"]["receivedAt"] for job in jobs for item in job.kwargs.get("batch") or []
                if (item.get("event") or {}).get("receivedAt")]
    if not jobs or not received or not times:
        return "startup: no jobs of this run found"
    return (f"startup: first instance received {min(received) - start:.3f} s after storescu started; "
            f"first job enqueued {min(_seconds(j.enqueued_at) for j in jobs) - start:.3f} s, started "
            f"{min(_seconds(j.started_at) for j in jobs) - start:.3f} s; first registration {times[0] - start:.3f} s"
            + "; the first jobs' instances received: " + ", ".join(
                f"{len(j.kwargs['batch'])} in {min(i['event']['receivedAt'] for i in j.kwargs['batch']) - start:.3f}"
                f"-{max(i['event']['receivedAt'] for i in j.kwargs['batch']) - start:.3f} s, enqueued "
                f"{_seconds(j.enqueued_at) - start:.3f} s"
                for j in sorted(jobs, key=lambda j: j.enqueued_at)[:4] if j.kwargs.get("batch")))


def series_latency(stack: Pipeline, cube: Cube, pacs: str, series: Path, stable_age: float) -> float:
    """Series mode: seconds from the series becoming complete (its last instance stored +
    the stable age) to CUBE's registration of it."""
    stack.orthanc.store([series], aet=pacs, pattern="*.dcm")
    complete = time.time() + stable_age
    wait_for(lambda: cube.registered(pacs)[0] >= 1, timeout=600, interval=0.05, what=f"the series from {pacs}")
    _, _, registered = cube.registered(pacs)
    return registered - complete


def services_with_batch(tmp_path: Path, size: int | None) -> Path:
    """The services folder, with chrisStore's batchSize set to `size` (None: as shipped)."""
    if size is None:
        return REPO / "services"
    folder = tmp_path / f"services-b{size}"
    if not folder.exists():
        shutil.copytree(REPO / "services", folder, ignore=shutil.ignore_patterns("__pycache__"))
        settings = folder / "registry" / "chris" / "settings.json"
        jobs = json.loads(settings.read_text())
        for job in jobs:
            if job["jobName"] == "chrisStore":
                job["batchSize"] = size
        settings.write_text(json.dumps(jobs, indent=2))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--cpu-ms", type=float, default=16.0)
    parser.add_argument("--verbose", action="store_true", help="print each pipeline run's timeline")
    parser.add_argument("--no-nagle", action="store_true",
                        help="the double's plain server (Nagle off) instead of runserver's way")
    parser.add_argument("--batch-sizes", default="",
                        help="chrisStore's batchSize for the pipeline runs, e.g. 1,8,16 (each side by side "
                             "with its own direct runs); default: as shipped in services/registry/chris")
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="a variant of the pipeline's configuration, measured side by side with the "
                             "shipped one (and its own direct runs), e.g. DICOMFLOW_PREFETCH=false; a key "
                             "Dicomflow.NAME sets the plugin's option NAME (a number if it reads as one), e.g. "
                             "Dicomflow.BuilderNice=0; repeatable")
    parser.add_argument("--pin-cube", action="store_true",
                        help="CUBE on core 0 alone, everything else (the pipeline, the direct clients) on "
                             "the other cores: as CUBE on a host of its own; shows the pipeline's own cost "
                             "apart from sharing CPU with CUBE")
    parser.add_argument("--series-workers", type=int, default=2,
                        help="workers of the series-mode stack (0: no series-mode runs)")
    args = parser.parse_args(argv)
    global VERBOSE
    VERBOSE = args.verbose
    files = sorted(SAG.glob("*.dcm"))
    counts = [int(n) for n in args.workers.split(",")]
    sizes: list[int | None] = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [None]
    configs: list[tuple[str, dict[str, str]]] = [("", {})] + [
        (text, dict(pair.split("=", 1) for pair in text.split(","))) for text in args.config]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        files_root = tmp_path / "cube-data"
        files_root.mkdir()
        redis_proc, connection = start_redis(tmp_path)
        REDIS_PIDS[:] = [redis_proc.pid]
        cube = Cube(files_root, args.cpu_ms / 1000, nagle=not args.no_nagle)
        if args.pin_cube:
            pin_cube(cube.pid)
        try:
            for n in counts:
                for size, (variant, extra) in [(size, config) for size in sizes for config in configs]:
                    connection.flushall()
                    url = f"redis://127.0.0.1:{connection.connection_pool.connection_kwargs['port']}/0"
                    config = {"CHRIS_URL": cube.url, "CHRIS_FILES_ROOT": str(files_root), "CHRIS_USERNAME": "chris",
                              "CHRIS_PASSWORD": "chris1234", "CHRIS_REGISTRATION": "pacsfiles"}
                    label = " ".join(filter(None, ["" if size is None else f"batchSize={size}", variant])) or "shipped"
                    tag = f"{n}V{len(rows)}"
                    env = {k: v for k, v in extra.items() if not k.startswith(PLUGIN_PREFIX)}
                    plugin = {k[len(PLUGIN_PREFIX):]: int(v) if v.lstrip("-").isdigit() else v
                              for k, v in extra.items() if k.startswith(PLUGIN_PREFIX)}
                    with Pipeline(tmp_path / f"stack{tag}", url, services_with_batch(tmp_path, size), workers=n,
                                  stable_age=5, extra_config={**config, **env}, plugin_options=plugin) as stack:
                        ways: dict[str, list[float]] = {how: [] for how in CLIENTS}
                        direct_rates, pipeline_rates = [], []
                        for round_ in range(args.rounds):
                            for index, how in enumerate(CLIENTS):
                                ways[how].append(direct(cube, files, files_root, f"D{tag}R{round_}W{index}", n, how))
                            direct_rates.append(max(rates[-1] for rates in ways.values()))
                            series = fresh_series(files, tmp_path / f"series-{tag}-{round_}")
                            pipeline_rates.append(pipeline(stack, cube, f"P{tag}R{round_}", series, len(files)))
                            shutil.rmtree(series)
                            print(f"N={n} {label} round {round_ + 1}: direct "
                                  + ", ".join(f"{how} {rates[-1]:.1f}/s" for how, rates in ways.items())
                                  + f"; pipeline {pipeline_rates[-1]:.1f}/s", flush=True)
                    rows.append((n, label, {how: statistics.median(rates) for how, rates in ways.items()},
                                 statistics.median(direct_rates), statistics.median(pipeline_rates),
                                 statistics.median(p / d for p, d in zip(pipeline_rates, direct_rates))))
            latencies = []
            if args.series_workers:
                connection.flushall()
                config = {**config, "CHRIS_REGISTRATION": "series"}
                with Pipeline(tmp_path / "stack-series", url, REPO / "services", workers=args.series_workers,
                              stable_age=2, extra_config=config) as stack:
                    for round_ in range(args.rounds):
                        series = fresh_series(files, tmp_path / f"series-s-{round_}")
                        latencies.append(series_latency(stack, cube, f"S{round_}", series, 2))
                        shutil.rmtree(series)
                        print(f"series mode round {round_ + 1}: registered {latencies[-1]:.2f} s after the "
                              "series was complete", flush=True)
        finally:
            cube.stop()
            redis_proc.terminate()
            redis_proc.wait(10)
            shutil.rmtree(files_root, ignore_errors=True)
    print(f"\nsag-anon, {len(files)} files; CUBE double in pacsfiles mode burning {args.cpu_ms:g} ms CPU per "
          f"registration under one lock, {'served as runserver (Nagle on)' if not args.no_nagle else 'Nagle off'}"
          f"{', alone on core 0 (--pin-cube)' if args.pin_cube else ''}; "
          f"medians of {args.rounds} rounds, side by side; CUBE's own rate: the best way of the round")
    width = max(len(row[1]) for row in rows)
    print(f"{'N':>3} {'pipeline':<{width}} " + " ".join(f"{how + ' /s':>17}" for how in CLIENTS)
          + f" {'CUBE own /s':>12} {'pipeline /s':>12} {'pipeline/own':>13}")
    for n, label, ways, d, p, ratio in rows:
        print(f"{n:>3} {label:<{width}} " + " ".join(f"{ways[how]:17.1f}" for how in CLIENTS)
              + f" {d:12.1f} {p:12.1f} {ratio:13.2f}")
    print("CPU ms per instance in the pipeline runs (median over runs): "
          + ", ".join(f"{name} {statistics.median(values):.1f}" for name, values in CPU.items()))
    if latencies:
        print(f"series mode ({args.series_workers} workers, StableAge 2 s): registered "
              f"{statistics.median(latencies):.2f} s (median; max {max(latencies):.2f} s) after the series "
              "was complete (target <= 2 s)")


if __name__ == "__main__":
    main()
