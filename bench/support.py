"""What the benchmarks share: a private redis-server, timing, printing."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import redis

from tests.support.procs import free_port, wait_for


@contextlib.contextmanager
def private_redis(pids: list[int] | None = None, prefix: Sequence[str] = (), aof: bool = False) -> Iterator[str]:
    """A redis-server on a free port for one benchmark run; yields its URL (its pid into `pids`).

    `prefix` goes before the command (e.g. ``["nice", "-n", "10"]``). With `aof`, it keeps
    an append-only file as run.sh's Redis does (``appendfsync everysec``), in a folder under
    TMPDIR (the disk the benchmark's Orthancs store to); else it keeps nothing on disk.
    """
    port = free_port()
    folder = tempfile.mkdtemp(prefix="dicomflow-bench-redis-")
    proc = subprocess.Popen([*prefix, shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "yes" if aof else "no", "--appendfsync", "everysec",
                             "--dir", folder],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if pids is not None:
        pids.append(proc.pid)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def up():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False
    wait_for(up, timeout=10, what="redis-server")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def best_rate(run: Callable[[], int], repeats: int = 3) -> tuple[float, list[float]]:
    """Run `run` (returns items done) `repeats` times; median items/s and all rates."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = run()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates), rates


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc; Linux), whichever of its threads started them."""
    found = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for thread in threads:  # a child is listed under the thread that started it, not the process
        try:
            with open(f"/proc/{pid}/task/{thread}/children") as handle:
                found += [int(p) for p in handle.read().split()]
        except OSError:
            continue
    return found


def cpu_seconds(*pids: int) -> float:
    """CPU time (user + system) used so far by these processes and all their live descendants."""
    total, todo, seen = 0.0, list(pids), set()
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        todo.extend(children(pid))
    return total
