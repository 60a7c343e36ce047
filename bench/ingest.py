"""Ingest benchmark: what the dicomflow plugin costs Orthanc, measured side by side in one run.

Sends N generated instances with dcmtk's storescu (one association, TCP_NODELAY) to
  (a) Orthanc without any plugin,
  (b) Orthanc with a Python plugin whose on-stored callback only returns (the design's floor),
  (b') Orthanc with a Python plugin that only registers a change callback (no instance hand-over),
  (b-capture) Orthanc with a Python plugin whose on-stored callback asks Orthanc for what the
      dicomflow plugin's asks (the file's bytes, AE titles, IP), queues it and drops it,
  (c) the full pipeline: Orthanc with the dicomflow plugin delivering to the real scheduler
      (gunicorn, at nice 10 as run.sh starts it) with its own redis-server (keeping an
      append-only file on the benchmark's disk, fsynced every second, as run.sh's Redis
      does) and the two example services (tempJob, and
      tempFollowJob depending on it), so every instance becomes two RQ jobs; with `--sink`,
      the counting sink instead (delivery only); `--scheduler-url` for one you run,
  (c-sink) the same plugin delivering to a counting sink (`bench/sink.py`: a process at
      nice 10 that answers every batch and parses no JSON) in the same run as (c):
      (c)/(c-sink) is what the scheduler and Redis cost the ingest, (c-sink)/(b) the plugin,
  (c-nice0) the same as (c) with the scheduler at nice 0 (at 10 the kernel lets Orthanc's
      ingest run first),
  (c-thread) the same as (c) with the events built by the sender thread in Orthanc's
      interpreter instead of the plugin's builder process (the default),
  (c-post) the same as (c) with the builder process handing the events back to the sender
      thread, which POSTs them (`BuilderDelivers` false: the plugin before session 7),
  (c-prio0) the same as (c) with the plugin's builder process and the scheduler's redis-server
      at nice 0 (before session 8; their own scheduler and redis-server),
  (c-nofile) the same as (c) with a redis-server that keeps nothing on disk (the benchmark's
      Redis before session 9; a scheduler and Redis of its own),
  (c-log) the same as (c) without the plugin's Lua script: stable series/studies found by
      reading Orthanc's change log every second, every instance's change included (before
      session 8),
  (c-json) the same as (c) with the plugin reading headers from Orthanc's JSON (made in the
      callback) instead of the file's bytes,
  (c-idle) the same as (c) with the scheduler under SCHED_IDLE instead of nice 10,
  (c-50ms) the same as (c) with the plugin's earlier batching (MaxBatchDelay 0.05 s,
      BatchSize 200) instead of 0.5 s / 1000,
for small (64x64) and CT-sized (512x512, 16-bit) instances. Prints median throughput, the
ratios (c)/(a) and (c)/(b) (of the medians, and the median of the per-round ratios) and the
stored -> enqueued latency p50/p99 (event `receivedAt` vs. the RQ job's `enqueued_at`; with
`--sink`: vs. the sink's arrival time). No worker runs during (c): the figure is what
delivery and scheduling cost the ingest.

Two methods:
  alternating (default)  one running Orthanc per setup; each round sends a new chunk of
                         --small/--ct instances to each, in an order that rotates; --rounds
  fresh                  a new Orthanc per run, --repeat runs per setup, interleaved

    .venv/bin/python -m bench.ingest --setups a,b,c --small 1000 --ct 100 --rounds 12
    .venv/bin/python -m bench.ingest --method fresh --small 2000 --ct 300 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC
from pathlib import Path

import redis
import requests
from rq import Queue
from rq.job import Job

from bench.support import children, cpu_seconds, private_redis
from bench.sink import CountingSink
from tests.support.orthanc import OrthancServer, leftovers, write_series
from tests.support.procs import free_port, wait_for

NOOP_STORED = '''"""Benchmark floor: an on-stored callback that only returns."""
import orthanc


def on_stored(dicom, instance_id):
    return None


orthanc.RegisterOnStoredInstanceCallback(on_stored)
'''

CAPTURE_STORED = '''"""Benchmark: an on-stored callback that captures what the dicomflow plugin's does.

The file's bytes, the calling AE title, the remote IP, the called AE title and the time, as
orthanc/dicomflow_capture.py's `on_stored` asks Orthanc for them, into a bounded queue under
a lock that nothing reads (no sender thread, no builder process, no delivery).
"""
import collections
import threading
import time

import orthanc

_queue = collections.deque(maxlen=1000)
_lock = threading.Lock()


def on_stored(dicom, instance_id):
    metadata = dicom.GetInstanceMetadata
    item = (instance_id, dicom.GetInstanceData(), dicom.GetInstanceRemoteAet(), metadata("RemoteIP"),
            metadata("CalledAET"), time.time())
    with _lock:
        _queue.append(item)


orthanc.RegisterOnStoredInstanceCallback(on_stored)
'''

NOOP_CHANGE = '''"""Benchmark: a plugin that only listens to changes (Orthanc hands over no instance)."""
import orthanc


def on_change(change_type, level, resource_id):
    return None


orthanc.RegisterOnChangeCallback(on_change)
'''

SETUPS = ("a", "b", "b'", "bk", "c", "cs", "c0", "ci", "cf", "ct", "cj", "cp", "cq", "cl", "cn")
#: The setups with the dicomflow plugin (all but "cs" deliver to a real scheduler unless --sink).
FULL = ("c", "cs", "c0", "ci", "cf", "ct", "cj", "cp", "cq", "cl", "cn")
REPO = Path(__file__).resolve().parent.parent


class RealScheduler:
    """The scheduler (gunicorn) + a private redis-server + the example services, for (c).

    Its redis-server keeps an append-only file as run.sh's does (`aof`), on the disk the
    Orthancs store to: its writes and fsyncs are part of what the pipeline costs the ingest.
    """

    token = "bench-token"

    def __init__(self, folder: Path, nice: int = 10, idle: bool = False, cpus: Sequence[int] = (),
                 redis_nice: int | None = None, aof: bool = True):
        self.folder = folder
        #: With `cpus` (--pin), the scheduler and its redis-server run only there.
        self.pinned = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        self.prefix = [*self.pinned, *(["chrt", "--idle", "0"] if idle else ["nice", "-n", str(nice)] if nice else [])]
        #: redis-server runs at the scheduler's nice value, as run.sh starts it, unless told otherwise.
        redis_nice = nice if redis_nice is None else redis_nice
        self.redis_prefix = [*self.pinned, *(["nice", "-n", str(redis_nice)] if redis_nice else [])]
        self.aof = aof
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> RealScheduler:
        services = self.folder / "services"
        for name in ("temp", "tempfollow"):
            shutil.copytree(REPO / "examples" / name / "registry", services / "registry" / name)
            shutil.copytree(REPO / "examples" / name / "module", services / "modules" / name)
        self.redis_pids: list[int] = []
        self._redis = private_redis(self.redis_pids, prefix=self.redis_prefix, aof=self.aof)
        redis_url = self._redis.__enter__()
        self.connection = redis.Redis.from_url(redis_url)
        env = {**os.environ, "DICOMFLOW_CONFIG": "", "DICOMFLOW_REDIS_URL": redis_url,
               "DICOMFLOW_SERVICES_DIR": str(services), "DICOMFLOW_HOME": str(self.folder / "home"),
               "DICOMFLOW_SCHEDULER_TOKEN": self.token, "DICOMFLOW_SCHEDULER_PORT": str(self.port)}
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "scheduler.cli"], env=env, cwd=REPO,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._up, timeout=30, what="the scheduler")
        return self

    def _up(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=1).ok
        except requests.RequestException:
            return False

    def cpu(self) -> dict[str, float]:
        """CPU seconds used so far by the scheduler (gunicorn and its worker) and by redis-server."""
        return {"scheduler": cpu_seconds(self.proc.pid), "redis": cpu_seconds(*self.redis_pids)}

    def reset(self) -> None:
        self.connection.flushall()

    def wait_for_jobs(self, count: int) -> None:
        """Wait until `count` instance events were scheduled."""
        wait_for(lambda: int(self.connection.hget("dicomflow:stats", "events:scheduled") or 0) >= count,
                 timeout=120, what=f"{count} scheduled events")

    def latencies(self) -> list[float]:
        """Stored -> enqueued latencies (s) of the jobs in the queue. Read after the CPU
        figures: fetching every job costs redis-server more than scheduling them."""
        queue = Queue("default", connection=self.connection)
        jobs = [j for j in Job.fetch_many(queue.job_ids, connection=self.connection) if j is not None]
        return [j.enqueued_at.replace(tzinfo=UTC).timestamp() - j.kwargs["event"]["receivedAt"]
                for j in jobs]

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(20)
        self._redis.__exit__(*exc)
LABELS = {
    "a": "(a) no plugin",
    "b": "(b) on-stored callback that only returns",
    "b'": "(b') change callback only",
    "bk": "(b-capture) on-stored callback capturing as the plugin's does",
    "c": "(c) full dicomflow plugin",
    "cs": "(c-sink) the same plugin, delivering to a counting sink",
    "c0": "(c-nice0) the same, scheduler at nice 0",
    "ci": "(c-idle) the same, scheduler under SCHED_IDLE",
    "cf": "(c-50ms) the same, MaxBatchDelay 0.05 s, BatchSize 200",
    "ct": "(c-thread) the same, events built in Orthanc",
    "cj": "(c-json) the same, headers from Orthanc's JSON",
    "cp": "(c-post) the same, the sender thread POSTs",
    "cq": "(c-prio0) the same, builder process and redis-server at nice 0",
    "cl": "(c-log) the same, stable series from the change log",
    "cn": "(c-nofile) the same, Redis keeping nothing on disk",
}


def median_interval(values: Sequence[float], resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """A 95 % bootstrap interval of the median of `values` (rounds resampled with replacement).

    The per-round ratios of one run spread about ±10 % on this VM; the interval says how far
    the run's median could move with other rounds of the same machine, so a target is met
    when the interval's low end is above it, not when the median happens to be.
    """
    rng = random.Random(seed)
    medians = [statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)]
    return _percentile(medians, 0.025), _percentile(medians, 0.975)  # _percentile sorts


def rotation_ratios(xs: Sequence[float], ys: Sequence[float], period: int) -> list[float]:
    """The ratio x/y of each full rotation of the order: the geometric mean of `period`
    consecutive rounds' ratios, in which every setup took every position once.

    On this VM's disk a round's first chunk is slower than the next: in two 40-round runs
    of (b) and (c), the rounds (c) went first gave (c)/(b) medians of 0.85 and 0.90, the
    rounds (b) went first 1.10 and 1.02, so the per-round ratios split into two groups and
    their median falls between them. Over a rotation each setup took each position once,
    and a position's factor cancels out of the product. Rounds past the last full rotation
    are left out.
    """
    ratios = [x / y for x, y in zip(xs, ys)]
    return [math.exp(sum(math.log(r) for r in ratios[i:i + period]) / period)
            for i in range(0, len(ratios) - period + 1, period)]


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _cpu(server: OrthancServer, pipeline: RealScheduler | None, plugin: bool = False,
         sink: CountingSink | None = None) -> dict[str, float]:
    """CPU seconds so far of Orthanc (with its builder process), of waited-for children
    (storescu) and of the pipeline or the sink; with the dicomflow `plugin`, also the part
    of Orthanc's that is the plugin's sender thread (its status says) and the builder process's."""
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"orthanc": cpu_seconds(server.proc.pid), "storescu": waited.ru_utime + waited.ru_stime}
    if plugin:
        out["sender"] = server.status()["senderCpuSeconds"]
        out["builder"] = cpu_seconds(*children(server.proc.pid))
    if pipeline is not None:
        out.update(pipeline.cpu())
    if sink is not None:
        out.update(sink.cpu())
    return out


def _pin_children(pid: int, cpus: Sequence[int]) -> None:
    """Move every thread of `pid`'s child processes (the plugin's builder) to `cpus`."""
    for child in children(pid):
        for task in os.listdir(f"/proc/{child}/task"):
            os.sched_setaffinity(int(task), cpus)


def _start_sink(token: str, cpus: Sequence[int]) -> CountingSink:
    """The counting sink (`bench/sink.py`), a process at nice 10 as the scheduler runs; with
    `cpus` (--pin), on those CPUs only."""
    pinned = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
    return CountingSink(token, prefix=[*pinned, "nice", "-n", "10"]).start()


def _orthanc_for(setup: str, work: Path, scripts: dict[str, Path], url: str, token: str) -> OrthancServer:
    """An Orthanc (not started) configured as `setup` asks."""
    plugin: bool | Path = {"a": False, "b": scripts["b"], "b'": scripts["b'"], "bk": scripts["bk"]}.get(setup, True)
    return OrthancServer(work, plugin=plugin, scheduler_url=url, token=token, stable_age=3600,
                         plugin_options={"HeaderReader": "json" if setup == "cj" else "raw",
                                         "BuilderProcess": setup != "ct", "BuilderDelivers": setup != "cp",
                                         "BuilderNice": 0 if setup == "cq" else 10,
                                         **({"MaxBatchDelay": 0.05, "BatchSize": 200} if setup == "cf" else {})},
                         extra={"LuaScripts": []} if setup == "cl" else None)


def settle(folder: Path) -> None:
    """Read every file of `folder` once, then write everything to disk.

    With `relatime` (Debian's default) the first read of a file after it was written
    updates its access time: without this, storescu's first send of a chunk would dirty
    its 1,000 inodes while it is timed, and the journal commits of that Orthanc's own
    fsyncs would carry them; the setup that goes first in a round would pay for it. (The
    read must come a clock tick after the write: an access time equal to the
    modification time is updated again.) What is left of a first position's cost is
    cancelled by reading the ratios per rotation (`rotation_ratios`).
    """
    time.sleep(0.02)
    for path in folder.iterdir():
        with open(path, "rb") as f:
            f.read(1)
    os.sync()


def run_once(setup: str, files_dir: Path, count: int, work: Path, scripts: dict[str, Path],
             scheduler_url: str | None, token: str, pipeline: RealScheduler | None = None) -> dict[str, float]:
    """Start a fresh Orthanc for `setup`, send the folder once, return rate (and latency for c)."""
    sink = None
    full = setup in FULL
    if full and pipeline is not None:
        pipeline.reset()
        scheduler_url, token = pipeline.url, pipeline.token
    url = scheduler_url or "http://127.0.0.1:9"
    if full and scheduler_url is None:
        sink = _start_sink(token, ())
        url = sink.url
    server = _orthanc_for(setup, work, scripts, url, token)
    try:
        server.start()
        cpu_before = _cpu(server, pipeline if full else None, full, sink)
        started = time.perf_counter()
        server.store([files_dir])
        elapsed = time.perf_counter() - started
        result = {"rate": count / elapsed, "seconds": elapsed}
        latencies = None
        if full:
            if pipeline is not None:
                pipeline.wait_for_jobs(count)
            elif sink is not None:
                latencies = sink.wait_for_events(count)
            result["drained"] = time.perf_counter() - started
            result["posts"] = server.status()["batches"]
        cpu_after = _cpu(server, pipeline if full else None, full, sink)
        if full and pipeline is not None:
            latencies = pipeline.latencies()
        if latencies:
            result["p50_ms"] = _percentile(latencies, 0.50) * 1000
            result["p99_ms"] = _percentile(latencies, 0.99) * 1000
        for name, before in cpu_before.items():
            result[f"cpu_{name}_ms"] = (cpu_after[name] - before) * 1000 / count
        if full:
            status = server.status()
            result["callbackErrors"] = status["callbackErrors"]
            result["spooled"] = status["spooled"]
        return result
    finally:
        server.stop()
        if sink is not None:
            sink.stop()
        if leftovers([server]):
            raise RuntimeError(f"Orthanc {sorted(server.pids)} did not stop")


def bench_size(name: str, count: int, rows: int, repeat: int, root: Path, scripts: dict[str, Path],
               scheduler_url: str | None, token: str,
               pipelines: dict[str, RealScheduler] | None = None,
               setups: Sequence[str] = SETUPS) -> dict[str, dict[str, float]]:
    """Every setup `repeat` times, interleaved, for one instance size; medians."""
    files_dir = root / f"{name}-dicom"
    started = time.perf_counter()
    write_series(files_dir, count, rows=rows, columns=rows, patient_id=f"BENCH{name.upper()}")
    settle(files_dir)
    size_kb = sum(p.stat().st_size for p in files_dir.iterdir()) / count / 1024
    print(f"\n## {name}: {count} instances {rows}x{rows} 16-bit, {size_kb:.0f} KB each "
          f"(generated in {time.perf_counter() - started:.1f} s)", flush=True)
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in setups}
    for round_ in range(repeat):
        for setup in setups:
            result = run_once(setup, files_dir, count, root / f"{name}-{setup}-{round_}", scripts,
                              scheduler_url, token, (pipelines or {}).get(setup))
            runs[setup].append(result)
            extra = (f", p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                     f"{result['posts']} POSTs" if "p50_ms" in result else "")
            cpu = ", ".join(f"{k[4:-3]} {v:.3f}" for k, v in result.items() if k.startswith("cpu_"))
            print(f"  round {round_ + 1} {LABELS[setup]:<45} {result['rate']:7.1f} inst/s{extra}; "
                  f"CPU ms/instance: {cpu}", flush=True)
    return _summary(runs, setups, bool(pipelines))


def _summary(runs: dict[str, list[dict[str, float]]], setups: Sequence[str],
             scheduled: bool, period: int = 0) -> dict[str, dict[str, float]]:
    """Print the medians, the ratios (of the medians and per round), CPU and latency; return the medians."""
    medians = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    rate = {s: medians[s]["rate"] for s in setups}
    print("  median rates: " + "  ".join(f"{LABELS[s].split()[0]} {r:.1f}" for s, r in rate.items()) + " instances/s")
    ratios = [(x, y) for x, y in (("c", "a"), ("c", "b"), ("cs", "b"), ("c", "cs"), ("b", "a"), ("b'", "a"),
                                  ("bk", "b"), ("cs", "bk"), ("c", "bk"),
                                  ("c0", "a"), ("c0", "b"), ("ci", "a"), ("ci", "b"), ("cf", "b"), ("ct", "b"),
                                  ("cj", "b"), ("cp", "b"), ("c", "cp"), ("cq", "b"), ("c", "cq"),
                                  ("cl", "b"), ("c", "cl"), ("cn", "b"), ("c", "cn"))
              if x in rate and y in rate]
    print("  ratios of the medians: " + "   ".join(
        f"{LABELS[x].split()[0]}/{LABELS[y].split()[0]} = {rate[x] / rate[y]:.3f}" for x, y in ratios))
    # Each round runs every setup back to back, so a round's ratio compares runs seconds
    # apart: steadier than the ratio of medians when the machine's speed drifts.
    for x, y in ratios:
        paired = sorted(rx["rate"] / ry["rate"] for rx, ry in zip(runs[x], runs[y]))
        low, high = median_interval(paired)
        medians[x][f"per_round_{y}"] = statistics.median(paired)
        medians[x][f"per_round_{y}_low"], medians[x][f"per_round_{y}_high"] = low, high
        print(f"  {LABELS[x].split()[0]}/{LABELS[y].split()[0]} per round: median {statistics.median(paired):.3f} "
              f"(95 % interval {low:.3f}-{high:.3f}), range {paired[0]:.3f}-{paired[-1]:.3f}")
        rotations = sorted(rotation_ratios([r["rate"] for r in runs[x]], [r["rate"] for r in runs[y]], period)
                           if period > 1 else [])
        if len(rotations) > 1:
            low, high = median_interval(rotations)
            medians[x][f"per_rotation_{y}"] = statistics.median(rotations)
            medians[x][f"per_rotation_{y}_low"], medians[x][f"per_rotation_{y}_high"] = low, high
            print(f"  {LABELS[x].split()[0]}/{LABELS[y].split()[0]} per rotation ({len(rotations)} x {period} rounds): "
                  f"median {statistics.median(rotations):.3f} (95 % interval {low:.3f}-{high:.3f}), "
                  f"range {rotations[0]:.3f}-{rotations[-1]:.3f}")
    for setup in setups:
        cpu = ", ".join(f"{k[4:-3]} {v:.3f}" for k, v in medians[setup].items() if k.startswith("cpu_"))
        print(f"  median CPU ms per instance {LABELS[setup].split()[0]}: {cpu}")
    others = [s for s in setups if s != "c" and "p50_ms" in medians[s]]
    if others:
        print("  stored -> enqueued/delivered latency p50 / p99: " + "  ".join(
            f"{LABELS[s].split()[0]} {medians[s]['p50_ms']:.0f} / {medians[s]['p99_ms']:.0f} ms" for s in others))
    if "p50_ms" in medians.get("c", {}):
        what = "enqueued" if scheduled else "delivered"
        print(f"  stored -> {what} latency (c): p50 {medians['c']['p50_ms']:.1f} ms, "
              f"p99 {medians['c']['p99_ms']:.1f} ms; all delivered "
              f"{medians['c']['drained'] - medians['c']['seconds']:.2f} s after the last C-STORE")
    return medians


def bench_alternating(name: str, rounds: int, chunk: int, rows: int, root: Path, scripts: dict[str, Path],
                      scheduler_url: str | None, token: str, pipelines: dict[str, RealScheduler],
                      setups: Sequence[str] = SETUPS, pipeline_cpus: Sequence[int] = ()) -> dict[str, dict[str, float]]:
    """One Orthanc per setup, all running; each round sends a fresh chunk to each, in turn.

    Starting a fresh Orthanc for every run (`--method fresh`) adds its warm-up and the
    machine's drift between runs to every figure. Here the setups take chunks of `chunk`
    new instances one after the other, seconds apart, in an order that rotates each round,
    so a round's ratios compare like with like; the medians of the per-round ratios are
    the figures. Every Orthanc's database grows alike. In (c), each chunk is waited for
    until all its events are scheduled before the next setup's chunk starts.
    """
    started = time.perf_counter()
    folders = []
    for round_ in range(rounds + 1):  # round 0 warms every setup up and is not counted
        folder = root / f"{name}-dicom" / str(round_)
        write_series(folder, chunk, rows=rows, columns=rows, patient_id=f"BENCH{name.upper()}{round_}")
        settle(folder)
        folders.append(folder)
    size_kb = sum(p.stat().st_size for p in folders[0].iterdir()) / chunk / 1024
    print(f"\n## {name}: {rounds} rounds of {chunk} instances {rows}x{rows} 16-bit, {size_kb:.0f} KB each, "
          f"alternating between running Orthancs (generated in {time.perf_counter() - started:.1f} s)", flush=True)
    sinks: dict[str, CountingSink] = {}
    servers: dict[str, OrthancServer] = {}
    try:
        for setup in setups:
            full = setup in FULL
            url = scheduler_url or "http://127.0.0.1:9"
            if full and setup in pipelines:
                url = pipelines[setup].url
                token = pipelines[setup].token
            elif full and scheduler_url is None:
                sinks[setup] = _start_sink(token, pipeline_cpus)
                url = sinks[setup].url
            servers[setup] = _orthanc_for(setup, root / f"{name}-{setup}", scripts, url, token).start()
        runs: dict[str, list[dict[str, float]]] = {s: [] for s in setups}
        for round_, folder in enumerate(folders):
            order = [setups[(i + round_) % len(setups)] for i in range(len(setups))]
            for setup in order:
                result = _send_chunk(servers[setup], folder, chunk, pipelines.get(setup), sinks.get(setup))
                if round_:
                    runs[setup].append(result)
            if not round_ and pipeline_cpus:
                for server in servers.values():  # the builder processes started with the first batch
                    _pin_children(server.proc.pid, pipeline_cpus)
            if round_:
                print(f"  round {round_:2d}: " + "  ".join(
                    f"{LABELS[s].split()[0]} {runs[s][-1]['rate']:6.1f}" for s in setups) + " inst/s", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        for sink in sinks.values():
            sink.stop()
        if leftovers(list(servers.values())):
            raise RuntimeError("an Orthanc of the benchmark did not stop")
    return _summary(runs, setups, bool(pipelines), period=len(setups))


def _send_chunk(server: OrthancServer, folder: Path, count: int, pipeline: RealScheduler | None,
                sink: CountingSink | None) -> dict[str, float]:
    """Send one folder to a running Orthanc; rate, CPU per instance, and (c)'s latencies."""
    if pipeline is not None:
        pipeline.reset()
    os.sync()  # the previous chunk's writes go to disk now, not during this one
    plugin = pipeline is not None or sink is not None
    cpu_before = _cpu(server, pipeline, plugin, sink)
    started = time.perf_counter()
    server.store([folder])
    elapsed = time.perf_counter() - started
    result = {"rate": count / elapsed, "seconds": elapsed}
    latencies = None
    if pipeline is not None:
        pipeline.wait_for_jobs(count)
    elif sink is not None:
        latencies = sink.wait_for_events(count)
    if plugin:
        result["drained"] = time.perf_counter() - started
    cpu_after = _cpu(server, pipeline, plugin, sink)
    if pipeline is not None:
        latencies = pipeline.latencies()
    if latencies:
        result["p50_ms"] = _percentile(latencies, 0.50) * 1000
        result["p99_ms"] = _percentile(latencies, 0.99) * 1000
    for name, before in cpu_before.items():
        result[f"cpu_{name}_ms"] = (cpu_after[name] - before) * 1000 / count
    return result


def main(args: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the figures (JSON too with --json)."""
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=1000,
                        help="64x64 instances per run, or per chunk when alternating (0: skip)")
    parser.add_argument("--ct", type=int, default=100,
                        help="512x512 instances per run, or per chunk when alternating (0: skip)")
    parser.add_argument("--method", choices=("alternating", "fresh"), default="alternating",
                        help="alternating: running Orthancs take chunks in turn (steadier); "
                             "fresh: a new Orthanc per run, the whole set at once")
    parser.add_argument("--rounds", type=int, default=12, help="alternating: counted rounds")
    parser.add_argument("--repeat", type=int, default=3, help="fresh: runs per setup (medians)")
    parser.add_argument("--scheduler-url", help="deliver (c) to this scheduler (you run it)")
    parser.add_argument("--sink", action="store_true", help="deliver (c) to the counting sink (bench/sink.py)")
    parser.add_argument("--token", default="bench-token", help="bearer token for (c)")
    parser.add_argument("--setups", default=",".join(SETUPS),
                        help=f"comma-separated subset of {','.join(SETUPS)} (default: all)")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    parser.add_argument("--pin", action="store_true",
                        help="Orthanc and storescu on the first CPU, the scheduler, redis-server and the "
                             "plugin's builder process on the others (alternating only)")
    options = parser.parse_args(args)
    setups = [s.strip() for s in options.setups.split(",") if s.strip()]
    if not setups or set(setups) - set(SETUPS):
        parser.error(f"--setups: choose from {','.join(SETUPS)}")
    ingest_cpus, pipeline_cpus = [], []
    if options.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2 or options.method != "alternating":
            parser.error("--pin needs two CPUs or more and the alternating method")
        ingest_cpus, pipeline_cpus = cpus[:1], cpus[1:]
    results = {}
    with tempfile.TemporaryDirectory(prefix="dicomflow-bench-") as tmp:
        root = Path(tmp)
        scripts = {"b": root / "noop_stored.py", "b'": root / "noop_change.py", "bk": root / "capture_stored.py"}
        scripts["b"].write_text(NOOP_STORED)
        scripts["b'"].write_text(NOOP_CHANGE)
        scripts["bk"].write_text(CAPTURE_STORED)
        with contextlib.ExitStack() as stack:
            pipelines: dict[str, RealScheduler] = {}
            if not options.sink and not options.scheduler_url:
                shared = stack.enter_context(RealScheduler(root / "pipeline", cpus=pipeline_cpus))
                pipelines = {"c": shared, "cf": shared, "ct": shared, "cj": shared, "cp": shared, "cl": shared}
                if "c0" in setups:
                    pipelines["c0"] = stack.enter_context(RealScheduler(root / "pipeline-nice0", nice=0,
                                                                        cpus=pipeline_cpus))
                if "cq" in setups:
                    pipelines["cq"] = stack.enter_context(RealScheduler(root / "pipeline-prio0", redis_nice=0,
                                                                        cpus=pipeline_cpus))
                if "cn" in setups:
                    pipelines["cn"] = stack.enter_context(RealScheduler(root / "pipeline-nofile", aof=False,
                                                                        cpus=pipeline_cpus))
                if "ci" in setups:
                    pipelines["ci"] = stack.enter_context(RealScheduler(root / "pipeline-idle", idle=True,
                                                                        cpus=pipeline_cpus))
            if ingest_cpus:
                # This thread starts every Orthanc and storescu: they inherit its CPU.
                os.sched_setaffinity(0, ingest_cpus)
            target = (options.scheduler_url or ("the counting sink" if options.sink else
                      "the real scheduler + redis-server, 2 jobs per instance"))
            how = (f"{options.rounds} rounds alternating between running Orthancs" if options.method == "alternating"
                   else f"{options.repeat} runs per setup, a fresh Orthanc each")
            pinned = (f"; pinned: Orthanc and storescu on CPU {ingest_cpus[0]}, the scheduler, redis-server and "
                      f"the builder process on CPU {','.join(map(str, pipeline_cpus))}" if ingest_cpus else "")
            print(f"storescu -> Orthanc 1.10, one association, TCP_NODELAY=1; {how}; target of (c): {target}{pinned}")
            for size, count, rows in (("small", options.small, 64), ("ct", options.ct, 512)):
                if not count:
                    continue
                if options.method == "alternating":
                    results[size] = bench_alternating(size, options.rounds, count, rows, root, scripts,
                                                      options.scheduler_url, options.token, pipelines, setups,
                                                      pipeline_cpus)
                else:
                    results[size] = bench_size(size, count, rows, options.repeat, root, scripts,
                                               options.scheduler_url, options.token, pipelines, setups)
    if options.json:
        options.json.parent.mkdir(parents=True, exist_ok=True)
        options.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
