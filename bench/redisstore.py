"""Benchmark: the Redis DICOM store (issue 18), each part against its physical limit, in one run.

  retrieval  one large generated file (--size-mb, 512) read back with the parallel reader, by
             chunk size x connections, next to `redis-benchmark` GET of the same value size and
             connections in the same run (the limit here); the ratio is the goal (>= 0.8).
  queries    the demo's three scenarios with --instances (10,000) indexed: p50/p99 latency.
  load       bulk load of a folder (sag-anon) in files/s, next to one SET per file (the limit).
  worker     the service's job function alone (jobs/s in one process).
  pipeline   the service's jobs/s against Orthanc's receive rate: one storescu of --copies copies of the
             folder (new UIDs), with --workers RQ workers (2), with the service's batchSize 1 and 16 in turn.
  drain      the same files sent with no worker running, then the workers started: how fast they drain
             the jobs against how fast Orthanc received (batchSize 1 and 16 in turn).

Usage: .venv/bin/python bench/redisstore.py [--parts retrieval,queries,load,worker,pipeline,drain] [--size-mb 512]
       [--instances 10000] [--copies 5] [--data ../shared/data/sag-anon] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
from pydicom.data import get_testdata_file

from bench.support import private_redis
from dicomflow.redisstore import RedisStore, resp
from dicomflow.redisstore.cli.load import _start_process, _work
from dicomflow.redisstore.fetch import fetch, transfer
from dicomflow.redisstore.model import read_header
from dicomflow.redisstore.query import parse_date_range

REPO = Path(__file__).resolve().parents[1]
CHUNK_KB = (64, 256, 1024)
CONNECTIONS = (1, 2, 4, 8)


def redis_benchmark_mb_s(url: str, size: int, connections: int, total_bytes: int) -> float:
    """MB/s of `redis-benchmark` GETs of one `size`-byte value with `connections` clients."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    requests = max(connections * 20, total_bytes // size)
    out = subprocess.run(["redis-benchmark", "-p", port, "-t", "set,get", "-d", str(size), "-c", str(connections),
                          "-n", str(requests), "--csv"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells[0] == "GET":
            return float(cells[1]) * size / 1e6
    raise RuntimeError(f"no GET line in redis-benchmark's output: {out}")


def _to_null(url: str, sop: str, connections: int, raw: bool | None = None) -> float:
    """MB/s of the parallel reader writing into /dev/null: the transfer alone, what redis-benchmark does."""
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        t = time.perf_counter()
        doc = asyncio.run(transfer(url, sop, fd, connections=connections, raw=raw))
        return int(doc["size"]) / 1e6 / (time.perf_counter() - t)
    finally:
        os.close(fd)


def _write_rate(folder: Path, size: int, chunk: int) -> float:
    """MB/s of writing `size` bytes into a new file in `folder`, `chunk` bytes a pwrite (the disk's part)."""
    block = os.urandom(chunk)
    path = folder / "write-rate.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t = time.perf_counter()
        os.ftruncate(fd, size)
        for offset in range(0, size, chunk):
            os.pwrite(fd, block, offset)
        return size / 1e6 / (time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()


def part_retrieval(size_mb: int, sample: Path, results: dict) -> None:
    work = Path(tempfile.mkdtemp(prefix="redisstore-bench-"))
    print(f"\n== retrieval: one {size_mb} MB file, MB/s, median of 3, side by side: the reader into a file in "
          f"{work.parent} / into /dev/null / redis-benchmark GET of the same value size and connections (the "
          "limit); the ratios file/limit and null/limit ==")
    big = work / "big.dcm"
    with open(big, "wb") as out:
        out.write(sample.read_bytes())
        block = os.urandom(1 << 20)
        for _ in range(size_mb):
            out.write(block)
    rows = []
    try:
        with private_redis() as url:
            for chunk_kb in CHUNK_KB:
                client = redis.Redis.from_url(url)
                client.flushall()
                store = RedisStore(client, "dicom:", chunk_kb * 1024)
                sop = store.store_file(str(big)).sop
                write = _write_rate(work, big.stat().st_size, chunk_kb * 1024)
                print(f"chunk {chunk_kb:>5} KiB (writing the file alone: {write:.0f} MB/s)", flush=True)
                for conns in CONNECTIONS:
                    to_file, to_null, limits = [], [], []
                    for _ in range(3):  # in turn, so that the machine's load falls on all three alike
                        got = fetch(url, sop, str(work / "back.dcm"), connections=conns, verify=False)
                        to_file.append(got.mb_per_s)
                        os.unlink(work / "back.dcm")
                        to_null.append(_to_null(url, sop, conns))
                        limits.append(redis_benchmark_mb_s(url, chunk_kb * 1024, conns,
                                                           min(big.stat().st_size, 256 << 20)))
                    file_rate, null_rate = statistics.median(to_file), statistics.median(to_null)
                    limit = statistics.median(limits)
                    rows.append({"chunk_kb": chunk_kb, "connections": conns, "reader_file_mb_s": round(file_rate),
                                 "reader_null_mb_s": round(null_rate), "redis_benchmark_mb_s": round(limit),
                                 "file_ratio": round(file_rate / limit, 2), "null_ratio": round(null_rate / limit, 2),
                                 "write_mb_s": round(write)})
                    print(f"  {conns} conn: {file_rate:6.0f} / {null_rate:6.0f} / {limit:6.0f}   "
                          f"({file_rate / limit:.2f}, {null_rate / limit:.2f})", flush=True)
            pooled = statistics.median(_to_null(url, sop, 4, raw=False) for _ in range(3))
            raw = statistics.median(_to_null(url, sop, 4) for _ in range(3))
            print(f"redis-py's asyncio client (hiredis), 1 MiB chunks, 4 connections, into /dev/null: {pooled:.0f} "
                  f"MB/s (the reader's own sockets: {raw:.0f})", flush=True)
            got = fetch(url, sop, str(work / "back.dcm"), connections=8, verify=True)
            print(f"with SHA-256 verification (1 MiB chunks, 8 connections): {got.size / 1e6 / got.seconds:.0f} MB/s "
                  "transfer, then the hash pass", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["retrieval"] = {"rows": rows, "redis_py_asyncio_null_mb_s": round(pooled), "reader_null_mb_s": round(raw)}


def _percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return samples[len(samples) // 2] * 1e3, samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e3


def part_queries(instances: int, files: list[Path], results: dict) -> None:
    print(f"\n== queries: the demo's three scenarios over {instances} instances (ms; demo: 1.36 / 7.64 / 1.77) ==")
    rng = random.Random(18)
    protocols = [f"PROTO_{n:02d}" for n in range(40)]
    # The demo's data set was pydicom's test files: its scenario 1 read MR_small.dcm (9.8 KB) by
    # name, its scenario 2 found one image, J2K_pixelrep_mismatch.dcm (138,518 bytes; protocol
    # '194', which no other file has). Every 100th instance here is a copy of one of those two
    # files, the second with a protocol of its own: the "as the demo" lines ask for them.
    rare: dict[str, str] = {}   # protocol -> its instance's StudyDate
    small_names: list[str] = []
    demo_bodies = {name: (Path(get_testdata_file(name)).read_bytes(), read_header(get_testdata_file(name)))
                   for name in ("MR_small.dcm", "J2K_pixelrep_mismatch.dcm")}
    with private_redis() as url:
        client = redis.Redis.from_url(url)
        store = RedisStore(client)
        bodies = [(p.read_bytes(), read_header(str(p))) for p in files[:50]]
        start = time.perf_counter()
        names = []
        for n in range(instances):
            data, header = bodies[n % len(bodies)]
            protocol = rng.choice(protocols)
            if n % 100 == 99:
                data, header = demo_bodies["J2K_pixelrep_mismatch.dcm"]
                protocol = f"RARE_{n:05d}"
            elif n % 100 == 49:
                data, header = demo_bodies["MR_small.dcm"]
            tags = dict(header.tags, SOPInstanceUID=f"1.2.826.0.1.3680043.18.{n}",
                        ProtocolName=protocol,
                        StudyDate=f"{rng.randint(2010, 2024)}0{rng.randint(1, 9)}15",
                        PatientID=f"P{n % 500:04d}")
            if protocol.startswith("RARE_"):
                rare[protocol] = tags["StudyDate"]
            names.append(f"file-{n:05d}.dcm")
            if n % 100 == 49:
                small_names.append(names[-1])
            store.store_bytes(data, tags, file_name=names[-1], transfer_syntax=header.transfer_syntax)
        took = time.perf_counter() - start
        stats = store.stats()
        print(f"stored {instances} in {took:.1f} s ({instances / took:.0f}/s); "
              f"used memory {stats['used_memory_human']}, {stats['memory_per_instance']} B per instance "
              f"for {stats['bytes'] // instances} B files (overhead x{stats['overhead_ratio']})", flush=True)
        hits = store.find({"ProtocolName": "PROTO_07"}, {"StudyDate": parse_date_range("2019")}, documents=False)[0]
        def bare_get():  # the floor of scenario 1: one GET of the same bytes, nothing else
            n = rng.randrange(instances)
            version = client.hget(store.keys.doc(f"1.2.826.0.1.3680043.18.{n}"), "version").decode()
            t = time.perf_counter()
            client.get(store.keys.chunk(f"1.2.826.0.1.3680043.18.{n}", version, 0))
            return time.perf_counter() - t
        bulk = resp.BulkConnection.connect(("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0])))

        def bare_mget():  # the floor of scenario 2's bytes: one MGET of its files' chunks into a buffer
            found = store.find({"ProtocolName": rng.choice(protocols)},
                               {"StudyDate": parse_date_range(str(rng.randint(2010, 2024)))})[1]
            keys = [store.keys.chunk(i.sop, i.doc["version"], 0) for i in found]
            into = memoryview(bytearray(sum(int(i.doc["size"]) for i in found)))
            t = time.perf_counter()
            bulk.send(resp.command("MGET", *keys))
            bulk.array()
            offset = 0
            for inst in found:
                offset += bulk.bulk_into(into[offset:offset + int(inst.doc["size"])])
            return time.perf_counter() - t
        rare_protocols = sorted(rare)

        def as_the_demo(verify: bool = True):   # scenario 2 as the demo ran it: one image found
            protocol = rng.choice(rare_protocols)
            found = store.find({"ProtocolName": protocol}, {"StudyDate": parse_date_range(rare[protocol][:4])},
                               with_bytes=True, verify=verify)
            assert found[0] == 1, found[0]
            return found
        scenarios = {
            "1 file by name": lambda: store.get(file_name=rng.choice(names)),
            "1 file by name, not verified": lambda: store.get(file_name=rng.choice(names), verify=False),
            f"2 protocol+year, with bytes ({hits} hits avg)": lambda: store.find(
                {"ProtocolName": rng.choice(protocols)}, {"StudyDate": parse_date_range(str(rng.randint(2010, 2024)))},
                with_bytes=True),
            "2 protocol+year, with bytes, not verified": lambda: store.find(
                {"ProtocolName": rng.choice(protocols)}, {"StudyDate": parse_date_range(str(rng.randint(2010, 2024)))},
                with_bytes=True, verify=False),
            "1 as the demo: a 9.8 KB file by name": lambda: store.get(file_name=rng.choice(small_names)),
            "2 as the demo: 1 hit (138 KB), with bytes": as_the_demo,
            "2 as the demo, not verified": lambda: as_the_demo(verify=False),
            "2 protocol+year, documents only": lambda: store.find(
                {"ProtocolName": rng.choice(protocols)}, {"StudyDate": parse_date_range(str(rng.randint(2010, 2024)))}),
            "3 counts per protocol": lambda: store.count("ProtocolName"),
        }

        def timed(call):
            def run() -> float:
                t = time.perf_counter()
                call()
                return time.perf_counter() - t
            return run
        measures = {"floor: one bare GET of a 232 KB value": bare_get,
                    "floor of 2: one MGET of its files (no search)": bare_mget,
                    **{name: timed(call) for name, call in scenarios.items()}}
        # In turn, ten calls of each per round: the machine's load falls on all of them alike, and
        # each is timed in a loop of its own as the demo timed it (one call of each in turn had the
        # 4.4 MB reads evict the caches the small ones then paid to refill: 0.38 ms for a 9.8 KB get
        # that takes 0.16 ms in a loop).
        for _ in range(5):
            for measure in measures.values():
                for _ in range(10):
                    measure()
        samples: dict[str, list[float]] = {name: [] for name in measures}
        for _ in range(100):
            for name, measure in measures.items():
                samples[name].extend(measure() for _ in range(10))
        rows = []
        for name, taken in samples.items():
            p50, p99 = _percentiles(taken)
            rows.append({"scenario": name, "p50_ms": round(p50, 3), "p99_ms": round(p99, 3)})
            print(f"{name:<45} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms", flush=True)
        bulk.close()
    results["queries"] = {"instances": instances, "file_bytes": stats["bytes"] // instances,
                          "memory_per_instance": stats["memory_per_instance"], "rows": rows}


def _load(url: str, files: list[Path], jobs: int) -> float:
    """Seconds `dicomflow-redis load -j JOBS` takes for `files` (its worker processes, started beforehand)."""
    with ProcessPoolExecutor(jobs, initializer=_start_process, initargs=(url, "dicom:", 256 * 1024)) as pool:
        list(pool.map(abs, range(jobs * 4)))  # the processes are up
        t = time.perf_counter()
        statuses = [status for _, status, _ in pool.map(_work, files, chunksize=4)]
        seconds = time.perf_counter() - t
    assert "failed" not in statuses, statuses
    return seconds


def part_load(files: list[Path], results: dict) -> None:
    print(f"\n== load: {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB ==")
    with private_redis() as url:
        client = redis.Redis.from_url(url)
        datas = [p.read_bytes() for p in files]
        rows = {}
        for jobs in (1, 2):
            def set_each(jobs: int = jobs) -> float:
                client.flushall()
                t = time.perf_counter()
                with ThreadPoolExecutor(jobs) as pool:
                    list(pool.map(lambda kv: client.set(f"f:{kv[0]}", kv[1]), enumerate(datas)))
                return time.perf_counter() - t

            def load(jobs: int = jobs) -> float:
                client.flushall()
                return _load(url, files, jobs)
            limit = min(set_each() for _ in range(3))
            ours = min(load() for _ in range(3))
            resumed = _load(url, files, jobs)
            rows[jobs] = {"load_files_s": round(len(files) / ours), "set_each_files_s": round(len(files) / limit),
                          "ratio": round(limit / ours, 2), "second_run_files_s": round(len(files) / resumed)}
            print(f"-j {jobs}: dicomflow-redis load {len(files) / ours:6.0f} files/s   "
                  f"one SET per file {len(files) / limit:6.0f} files/s   ({limit / ours:.2f})   "
                  f"second run (all skipped) {len(files) / resumed:6.0f} files/s", flush=True)
    results["load"] = rows


def part_worker(files: list[Path], results: dict) -> None:
    """The service's worker function alone, called as an RQ worker calls it (headers from the plugin)."""
    import importlib

    print(f"\n== worker: the redisstore job function alone, {len(files)} files ==")
    sys.path.insert(0, str(REPO / "services" / "modules"))
    worker = importlib.import_module("redisstore").worker
    jobs = [(str(p), read_header(str(p))) for p in files]
    with private_redis() as url, private_redis() as queue_url:
        config = {"REDIS_STORE_URL": url}
        queue = redis.Redis.from_url(queue_url)
        rates = []
        for _ in range(3):
            redis.Redis.from_url(url).flushall()
            t = time.perf_counter()
            for path, header in jobs:
                worker(jobName="redisstore", headers=header.tags, params={}, added_params={}, dcmpath=path,
                       event={"orthanc": {"instance": "x"}, "transferSyntax": header.transfer_syntax},
                       config=config, connection=queue)
            rates.append(len(jobs) / (time.perf_counter() - t))
    rate = statistics.median(rates)
    print(f"{rate:.0f} jobs/s in one worker process ({1e3 / rate:.2f} ms per job)", flush=True)
    results["worker"] = {"jobs_s": round(rate)}


def _copies(files: list[Path], copies: int, folder: Path) -> list[Path]:
    """`copies` copies of `files` with new Series and SOP Instance UIDs (each a new instance to Orthanc)."""
    import pydicom
    from pydicom.uid import generate_uid

    out = []
    for n in range(copies):
        series = generate_uid()
        for path in files:
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            target = folder / f"{n}-{path.name}"
            ds.save_as(target, enforce_file_format=True)
            out.append(target)
    return out


def _services_with_batch(folder: Path, batch_size: int) -> Path:
    """A copy of the built-in services whose redisstore job takes `batch_size` instances (1: one per job)."""
    services = folder / f"services-batch{batch_size}"
    shutil.copytree(REPO / "services", services, ignore=shutil.ignore_patterns("__pycache__"))
    settings = services / "registry" / "redisstore" / "settings.json"
    spec = json.loads(settings.read_text())
    spec.pop("batchSize", None)
    if batch_size > 1:
        spec["batchSize"] = batch_size
    settings.write_text(json.dumps(spec, indent=1))
    return services


def _pipeline_run(sent: list[Path], data: Path, work: Path, services: Path, workers: int) -> dict:
    """One storescu of `data` into a fresh stack; when each file was stored, sampled every 20 ms."""
    import threading

    from tests.support.stack import Pipeline

    with private_redis(aof=True) as queue_url, private_redis() as store_url:
        store = RedisStore(redis.Redis.from_url(store_url))
        config = work / "dicomflow.env"
        config.write_text(f"REDIS_STORE_URL={store_url}\n")
        samples: list[tuple[float, int]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                samples.append((time.perf_counter(), store.stats()["instances"]))
                if samples[-1][1] >= len(sent) or samples[-1][0] - t0 > 600:
                    return
                time.sleep(0.02)
        with Pipeline(work / f"stack-{services.name}", queue_url, services, workers=workers,
                      extra_config={"DICOMFLOW_CONFIG": str(config)}) as stack:
            t0 = time.perf_counter()
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            stack.orthanc.store([data], pattern="*.dcm")
            t1 = time.perf_counter()
            sampler.join(600)
            done.set()
        if samples[-1][1] < len(sent):
            raise RuntimeError(f"only {samples[-1][1]} of {len(sent)} stored after 600 s")
    t2 = samples[-1][0]
    # The store's own pace: from 10 % to 90 % of the files stored (the plugin's first delivery and the
    # last job's tail aside), against Orthanc's average receive rate over the whole send.
    t10 = next(t for t, n in samples if n >= len(sent) * 0.1)
    t90 = next(t for t, n in samples if n >= len(sent) * 0.9)
    received = len(sent) / (t1 - t0)
    stored_pace = len(sent) * 0.8 / (t90 - t10)
    return {"files": len(sent), "orthanc_files_s": round(received, 1), "stored_files_s": round(stored_pace, 1),
            "pace_ratio": round(stored_pace / received, 2), "lag_s": round(t2 - t1, 2),
            "end_to_end_ratio": round(len(sent) / (t2 - t0) / received, 2)}


def _backlog_run(sent: list[Path], data: Path, work: Path, services: Path, workers: int) -> dict:
    """Send `data` with no worker running, then start `workers` and time how fast they drain the jobs."""
    from rq import Queue

    from tests.support.stack import Pipeline

    with private_redis(aof=True) as queue_url, private_redis() as store_url:
        store = RedisStore(redis.Redis.from_url(store_url))
        queue = Queue("default", connection=redis.Redis.from_url(queue_url))
        config = work / "dicomflow.env"
        config.write_text(f"REDIS_STORE_URL={store_url}\n")
        with Pipeline(work / f"backlog-{services.name}", queue_url, services, workers=0,
                      extra_config={"DICOMFLOW_CONFIG": str(config)}) as stack:
            t0 = time.perf_counter()
            stack.orthanc.store([data], pattern="*.dcm")
            received = len(sent) / (time.perf_counter() - t0)
            seen, stable = -1, time.perf_counter()
            while time.perf_counter() - stable < 2.0:  # the plugin's last deliveries are planned
                if queue.count != seen:
                    seen, stable = queue.count, time.perf_counter()
                time.sleep(0.1)
            for n in range(workers):  # as Pipeline.start does
                log = open(stack.folder / f"worker-{n}.log", "ab")
                stack.workers.append(subprocess.Popen([sys.executable, "-m", "worker.cli"], env=stack.env, cwd=REPO,
                                                      stdout=log, stderr=subprocess.STDOUT))
            first = None
            while (count := store.stats()["instances"]) < len(sent):
                if first is None and count:
                    first = (time.perf_counter(), count)  # the workers are up (their start-up aside)
                if time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"only {count} of {len(sent)} stored after 600 s")
                time.sleep(0.01)
            drained = (len(sent) - first[1]) / (time.perf_counter() - first[0])
    return {"files": len(sent), "jobs": seen, "orthanc_files_s": round(received, 1),
            "drain_files_s": round(drained, 1), "ratio": round(drained / received, 2)}


def part_drain(files: list[Path], copies: int, results: dict, workers: int = 2,
               batch_sizes: tuple[int, ...] = (1, 16)) -> None:
    work = Path(tempfile.mkdtemp(prefix="redisstore-bench-drain-"))
    try:
        (work / "data").mkdir()
        sent = _copies(files, copies, work / "data")
        print(f"\n== drain: Orthanc receives {len(sent)} files with no worker running, then {workers} workers drain "
              f"the redisstore jobs; batchSize {' vs '.join(map(str, batch_sizes))} in turn, each on a fresh stack ==")
        rows = {}
        for batch_size in batch_sizes:
            row = _backlog_run(sent, work / "data", work, _services_with_batch(work, batch_size), workers)
            rows[batch_size] = row
            print(f"batchSize {batch_size:>2}: Orthanc received {row['orthanc_files_s']:.0f} files/s; {row['jobs']} "
                  f"jobs drained at {row['drain_files_s']:.0f} files/s ({row['ratio']:.2f} of the receive rate)",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["drain"] = rows


def part_pipeline(files: list[Path], copies: int, results: dict, workers: int = 2,
                  batch_sizes: tuple[int, ...] = (1, 16)) -> None:
    work = Path(tempfile.mkdtemp(prefix="redisstore-bench-stack-"))
    try:
        (work / "data").mkdir()
        sent = _copies(files, copies, work / "data")
        print(f"\n== pipeline: the redisstore service's jobs vs Orthanc's receive rate ({len(sent)} files, "
              f"{workers} workers; batchSize {' vs '.join(map(str, batch_sizes))} in turn, each on a fresh stack) ==")
        rows = {}
        for batch_size in batch_sizes:
            row = _pipeline_run(sent, work / "data", work, _services_with_batch(work, batch_size), workers)
            rows[batch_size] = row
            print(f"batchSize {batch_size:>2}: Orthanc received {row['orthanc_files_s']:.0f} files/s; stored at "
                  f"{row['stored_files_s']:.0f} files/s from 10 % to 90 % ({row['pace_ratio']:.2f} of the receive "
                  f"rate); the last stored {row['lag_s']:.2f} s after the last was received (end to end "
                  f"{row['end_to_end_ratio']:.2f})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["pipeline"] = rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="retrieval,queries,load,worker,pipeline,drain")
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--instances", type=int, default=10000)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sag-anon")
    parser.add_argument("--copies", type=int, default=5, help="copies of the folder the pipeline part sends")
    parser.add_argument("--workers", type=int, default=2, help="RQ workers of the pipeline part")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TCP_NODELAY", "1")
    files = sorted(args.data.glob("*.dcm"))
    if not files:
        print(f"no *.dcm under {args.data}", file=sys.stderr)
        return 1
    results: dict = {"cpus": os.cpu_count()}
    parts = args.parts.split(",")
    if "retrieval" in parts:
        part_retrieval(args.size_mb, files[0], results)
    if "queries" in parts:
        part_queries(args.instances, files, results)
    if "load" in parts:
        part_load(files, results)
    if "worker" in parts:
        part_worker(files, results)
    if "pipeline" in parts:
        part_pipeline(files, args.copies, results, args.workers)
    if "drain" in parts:
        part_drain(files, args.copies, results, args.workers)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
