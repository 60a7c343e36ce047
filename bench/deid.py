"""Benchmark: de-identification instances/s against pydicom's plain read + write of the same files.

The floor of any pydicom-based de-identifier is reading and writing each file with pydicom;
the issue's goal is at least 0.5 of that rate. In one run, on the same files (sag-anon,
192 instances), rounds alternate between:
  - ``pydicom``: ``dcmread`` + ``save_as`` of each file (the floor);
  - ``deid``: ``dcmread`` + ``Deidentifier.dataset`` (profile ``basic`` with date shifting) +
    ``save_as`` (what the engine costs);
  - ``service``: the deid service's worker on the whole folder as one study push (series read,
    de-identification, temporary file + rename per instance, the export records in SQLite: the
    claim and the result), with the export forced each round.
Each figure is the median of the rounds, in instances per CPU second of the process (the
machine may be busy with other work: wall-clock rates are printed too, in brackets).

Usage: .venv/bin/python bench/deid.py [--data ../shared/data/sag-anon] [--rounds 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom

from dicomflow.extracts.deid import Deidentifier, Profile
from dicomflow.extracts.records import open_records

SECRET = b"bench-deid-secret-0123456789"


def _timed(run: Callable[[], int]) -> tuple[float, float]:
    """Items per second of wall time and per second of this process's CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    n = run()
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sag-anon")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    files = sorted(args.data.glob("*.dcm"))
    if not files:
        print(f"no *.dcm in {args.data}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-deid-"))
    try:
        return _run(files, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(files: list[Path], work: Path, args: argparse.Namespace) -> int:
    plain_out, deid_out = work / "plain", work / "deid"
    plain_out.mkdir()
    deid_out.mkdir()
    deid = Deidentifier(Profile.load("basic").with_changes(date_shift=True), SECRET, "bench")

    def plain() -> int:
        for path in files:
            pydicom.dcmread(path).save_as(plain_out / path.name)
        return len(files)

    def engine() -> int:
        for path in files:
            deid.dataset(pydicom.dcmread(path)).save_as(deid_out / path.name, enforce_file_format=True)
        return len(files)

    service = _service(files, work)
    for run in (plain, engine, service):   # warm-up: imports, profile, page cache
        run()
    names = ("pydicom", "deid", "service")
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name, run in zip(names, (plain, engine, service)):
            w, c = _timed(run)
            wall[name].append(w)
            cpu[name].append(c)
    median = {name: statistics.median(values) for name, values in cpu.items()}
    median_wall = {name: statistics.median(values) for name, values in wall.items()}
    figures = {
        "files": len(files), "rounds": args.rounds, "python": platform.python_version(),
        "pydicom": pydicom.__version__, "cpus": os.cpu_count(),
        "instancesPerCpuSecond": {k: round(v, 1) for k, v in median.items()},
        "instancesPerSecond": {k: round(v, 1) for k, v in median_wall.items()},
        "ratioToPydicom": {k: round(v / median["pydicom"], 2) for k, v in median.items() if k != "pydicom"},
        "ratioToPydicomWall": {k: round(v / median_wall["pydicom"], 2) for k, v in median_wall.items()
                               if k != "pydicom"},
        "allCpuRates": {k: [round(r, 1) for r in v] for k, v in cpu.items()},
    }
    print(f"{len(files)} files, {args.rounds} rounds (median), one process; instances per CPU second "
          "(per wall second in brackets)")
    for name in names:
        ratio = "" if name == "pydicom" else \
            f"   {figures['ratioToPydicom'][name]:.2f} of pydicom's rate ({figures['ratioToPydicomWall'][name]:.2f})"
        print(f"  {name:<8} {median[name]:8.1f} /s  {1000 / median[name]:6.2f} ms/instance "
              f"({median_wall[name]:6.1f} /s){ratio}")
    goal = figures["ratioToPydicom"]["deid"]
    print(f"de-identification / plain read+write: {goal:.2f} (goal >= 0.5: {'met' if goal >= 0.5 else 'NOT met'})")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def _service(files: list[Path], work: Path) -> Callable[[], int]:
    """The deid service's worker over the files as one study push, its export forced every round."""
    spec = importlib.util.spec_from_file_location("deid_bench_module", REPO / "services" / "modules" / "deid"
                                                  / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    projects = work / "projects"
    projects.mkdir()
    (projects / "bench.yaml").write_text("slug: bench\nstudies: {all: true}\nsecret: {env: BENCH_DEID_SECRET}\n"
                                         "deid: {dateShift: true}\n")
    os.environ["BENCH_DEID_SECRET"] = SECRET.decode()
    study = work / "study"
    study.mkdir()
    for path in files:
        os.symlink(path, study / path.name)
    config = {"DICOMFLOW_PROJECTS_DIR": str(projects), "DICOMFLOW_EXTRACTS_DIR": str(work / "extracts"),
              "DICOMFLOW_HOME": str(work / "home")}
    records_url = f"sqlite:///{work / 'home' / 'exports.db'}"

    def run() -> int:
        result = module.worker(jobName="deid", headers={}, params={}, added_params={"deid": {"projects": ["bench"]}},
                               dcmpath=str(study), event={}, config=config)
        assert result["projects"]["bench"]["status"] == "done", result
        records = open_records(records_url)    # force the next round (outside the timed part's work
        try:                                    # would be fairer, but it is one UPDATE: ~1 ms)
            records.request_rerun("bench", None, force=True)
        finally:
            records.dispose()
        return len(files)

    return run


if __name__ == "__main__":
    raise SystemExit(main())
