"""Benchmark: do N uploads to one export destination take N / rate seconds, however many workers send?

For W = 1, 2, 4 worker processes: N synthetic instances (fresh UIDs each run) are split over W
processes, each of which calls the real `send_study` (STOW-RS, one instance per request, then the
QIDO-RS check) to a DICOMweb Orthanc (Debian's plugin), all sharing the destination's token bucket
in one redis-server. Measured from the moment all processes are released: when the last token
was granted (the limiter) and when the last upload and its check were done (end to end).

The token bucket holds `rate` x 1 s (one burst). Two starting states:
  busy    the bucket was just emptied (a destination in steady use): expected N/rate <= elapsed
          <= N/rate + one burst (1 s);
  rested  the bucket is full (an idle destination): the first burst goes at once, so
          (N - burst)/rate <= elapsed <= N/rate + one burst.

Usage: .venv/bin/python -m bench.export_rate [--n 100] [--rate 20] [--workers 1,2,4] [--states busy,rested]
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.support import private_redis  # noqa: E402
from dicomflow.extracts.destinations import DestinationSettings, send_study  # noqa: E402
from dicomflow.extracts.project import load_project  # noqa: E402
from dicomflow.ratelimit import BucketKeys, TokenBucket  # noqa: E402
from tests.support.orthanc import OrthancServer, stop_all, write_series  # noqa: E402

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
NAME = "bench-pacs"


def _sender(project_file: str, folder: str, redis_url: str, env: dict, ready, go, out) -> None:
    import os

    os.environ.update(env)
    project = load_project(project_file)
    connection = redis.Redis.from_url(redis_url)
    settings = DestinationSettings(rate_max_wait=60)
    # when each token was granted (the limiter's own figure, apart from upload and check times)
    granted: list[float] = []
    acquire = TokenBucket.acquire

    def timed(self, *args, **kwargs):
        waited = acquire(self, *args, **kwargs)
        granted.append(time.time())
        return waited
    TokenBucket.acquire = timed
    ready.put(os.getpid())
    go.wait()
    result = send_study(project, NAME, Path(folder), study_id="bench", extract_time=dt.datetime.now(dt.UTC),
                        settings=settings, connection=connection)
    out.put((len(result.sent), len(result.failed), time.time(), granted))


def run(n: int, rate: float, workers: int, state: str, pacs: OrthancServer, redis_url: str, scratch: Path,
        project_file: Path, env: dict) -> dict:
    folder = scratch / f"run-{workers}-{state}"
    files = write_series(folder / "all", n, rows=32, columns=32)
    parts = []
    for w in range(workers):
        part = folder / f"part-{w}"
        part.mkdir()
        for path in files[w::workers]:
            shutil.move(str(path), part / path.name)
        parts.append(part)
    spawn = multiprocessing.get_context("spawn")
    ready, go, out = spawn.Queue(), spawn.Event(), spawn.Queue()
    procs = [spawn.Process(target=_sender, args=(str(project_file), str(p), redis_url, env, ready, go, out))
             for p in parts]
    for proc in procs:
        proc.start()
    for _ in procs:                                    # every process imported and waiting
        ready.get(timeout=120)
    connection = redis.Redis.from_url(redis_url)
    keys = BucketKeys.named(NAME)
    connection.delete(keys.bucket)                     # rested: a full bucket
    start = time.time()                                # (before the drain: no token can come earlier)
    if state == "busy":
        bucket = TokenBucket(connection, keys, rate)
        while bucket.try_acquire() == 0:               # empty it, as steady use leaves it
            pass
    go.set()
    answers = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(30)
    elapsed = max(a[2] for a in answers) - start
    tokens = sorted(t for a in answers for t in a[3])
    last_token = tokens[-1] - start
    sent, failed = sum(a[0] for a in answers), sum(a[1] for a in answers)
    burst = rate * 1.0
    lower = n / rate if state == "busy" else (n - burst) / rate
    upper = n / rate + 1.0
    shutil.rmtree(folder, ignore_errors=True)
    return {"workers": workers, "state": state, "sent": sent, "failed": failed, "elapsed": elapsed,
            "tokens": len(tokens), "last_token": last_token,
            "ideal": n / rate, "lower": lower, "upper": upper, "within": lower <= elapsed <= upper,
            "tokens_within": lower <= last_token <= upper}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="instances per run")
    parser.add_argument("--rate", type=float, default=20.0, help="the destination's rate (instances/s)")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--states", default="busy,rested")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="dicomflow-bench-export-"))
    pacs = OrthancServer(scratch / "pacs", plugin=False, extra={
        "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    rows = []
    try:
        pacs.start()
        (scratch / "projects").mkdir()
        project_file = scratch / "projects" / "bench.yaml"
        project_file.write_text(
            f"slug: bench\nstudies: {{all: true}}\nsecret: {{env: BENCH_SECRET}}\n"
            f"destinations:\n  dicom: [{NAME}]\n  endpoints:\n"
            f"    {NAME}: {{type: dicomweb, secrets: {{envPrefix: BENCH_PACS}}, rate: {args.rate}, "
            f"maxBatchInstances: 1}}\n")
        env = {"BENCH_SECRET": "bench-secret-0123456789abcdef", "BENCH_PACS_URL": pacs.url + "/dicom-web",
               "BENCH_PACS_USERNAME": pacs.username, "BENCH_PACS_PASSWORD": pacs.password}
        with private_redis() as redis_url:
            for workers in (int(w) for w in args.workers.split(",")):
                for state in args.states.split(","):
                    row = run(args.n, args.rate, workers, state, pacs, redis_url, scratch, project_file, env)
                    rows.append(row)
                    print(f"W={row['workers']} {row['state']:6} sent {row['sent']} failed {row['failed']} "
                          f"last token {row['last_token']:.2f} s, elapsed {row['elapsed']:.2f} s (N/rate "
                          f"{row['ideal']:.2f}; bounds "
                          f"{row['lower']:.2f}..{row['upper']:.2f}) {'ok' if row['within'] else 'OUTSIDE'}",
                          flush=True)
    finally:
        stop_all([pacs])
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n| workers | bucket | N | last token s | all uploads done s | N/rate s | expected s |\n"
          "|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['state']} | {row['sent']} | {row['last_token']:.2f}"
              f"{'' if row['tokens_within'] else ' (outside)'} | {row['elapsed']:.2f}"
              f"{'' if row['within'] else ' (outside)'} | {row['ideal']:.2f} | {row['lower']:.2f}–{row['upper']:.2f} |")
    return 0 if all(r["tokens_within"] and not r["failed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
