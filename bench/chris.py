"""Benchmark: instances/s through ChRIS store + register (pacsfiles and series mode) vs bare store.

Runs on ../shared/data/sag-anon (192 files) against the local CUBE double (tests/support), a
redis-server of its own, the rate limit off, one worker (the job functions called in turn).
Usage: .venv/bin/python bench/chris.py [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dicomflow.chris.instance import read_instance_tags
from dicomflow.chris.jobs import finish_series, register_instance, store_instance
from dicomflow.chris.paths import instance_path
from dicomflow.chris.settings import ChrisSettings
from dicomflow.chris.store import write_file
from tests.support.chris_env import SAG_SERIES_UID, chris_config, instance_event, orthanc_id, series_event
from tests.support.cube_double import CubeDouble
from tests.support.procs import free_port, wait_for

SAG = REPO.parent / "shared" / "data" / "sag-anon"


def start_redis(folder: Path) -> tuple[subprocess.Popen, redis.Redis]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_for(lambda: _ping(client), timeout=10, what="redis-server")
    return proc, client


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def bare_store(files: list[Path], root: Path) -> float:
    """Path computation + atomic write only: the floor of what a ChRIS store can cost."""
    start = time.perf_counter()
    for path in files:
        write_file(path, root, instance_path(read_instance_tags(path), "OXITESTORTHANC").path)
    return time.perf_counter() - start


def pipeline(files: list[Path], settings: ChrisSettings, connection: redis.Redis, register: bool) -> float:
    """The service's jobs in turn: store (+ register per file), then the series job."""
    start = time.perf_counter()
    for path in files:
        event = instance_event(orthanc_id(path))
        store_instance(settings, connection, path, event)
        if register:
            register_instance(settings, connection, path, event)
    finish_series(settings, connection, SAG, series_event([orthanc_id(p) for p in files]), SAG_SERIES_UID)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    files = sorted(SAG.glob("*.dcm"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        proc, connection = start_redis(tmp_path)
        try:
            results: dict[str, list[float]] = {"bare store (write only)": [], "store job only": [],
                                               "pacsfiles: store + register": [], "series: store + register": []}
            for round_ in range(args.rounds):
                root = tmp_path / f"r{round_}"
                results["bare store (write only)"].append(bare_store(files, root / "bare"))
                for label, mode, register in (("store job only", "cube7", False),
                                              ("pacsfiles: store + register", "cube5", True),
                                              ("series: store + register", "cube7", False)):
                    connection.flushall()
                    data = root / label.split(":")[0].replace(" ", "-")
                    data.mkdir(parents=True)
                    cube = CubeDouble(data, mode=mode).start()
                    try:
                        settings = ChrisSettings.from_config(chris_config(cube, CHRIS_RATE_LIMIT="0"))
                        if label == "store job only":
                            start = time.perf_counter()
                            for path in files:
                                store_instance(settings, connection, path, instance_event(orthanc_id(path)))
                            results[label].append(time.perf_counter() - start)
                        else:
                            results[label].append(pipeline(files, settings, connection, register))
                        expected = 192 if label != "store job only" else 0
                        registered = len([p for p in cube.state.files if p.startswith("SERVICES/PACS/OXITESTORTHANC/")])
                        assert registered == expected, (label, registered)
                    finally:
                        cube.stop()
                shutil.rmtree(root)
        finally:
            proc.terminate()
            proc.wait(10)
    bare = len(files) / min(results["bare store (write only)"])
    print(f"sag-anon: {len(files)} instances, best of {args.rounds} rounds, one worker, rate limit off,")
    print("CUBE double: token auth, 5 ms per database write (tests/support/cube_double.py)")
    print(f"{'what':32} {'inst/s':>9} {'vs bare':>8}")
    for label, times in results.items():
        rate = len(files) / min(times)
        print(f"{label:32} {rate:9.0f} {rate / bare:8.2f}")


if __name__ == "__main__":
    main()
