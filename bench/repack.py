"""Benchmark: repacking the sag-anon series with px-repack and with dicomflow's repack, in one run.

Prints per-file times and ratios for
  (a) one process per file, the ``storescp -xcr`` way, for both tools, against the floor of
      starting the same interpreter (``python -c pass``);
  (b) dicomflow's repack inside one process: the service's worker function (as an RQ
      worker calls it) and the whole-folder mode (``python -m dicomflow.repack`` without
      ``--xcrfile``);
  and, for scale, how fast Orthanc (``/usr/sbin/Orthanc``) and dcmtk's storescp receive the
  same files from storescu (TCP_NODELAY=1).

Usage: .venv/bin/python bench/repack.py [--px-files 20] [--data ../shared/data/sag-anon] [--out FILE]
px-repack runs in its own virtualenv (tests/support/pypx_env.py creates it when absent).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.procs import free_port, wait_for
from tests.support.pypx_env import px_repack

PY = sys.executable
NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def per_process(commands: Sequence[Sequence[str]], prepare: Callable[[], None] | None = None) -> list[float]:
    """Run each command as its own process, one after the other; the wall time of each (s)."""
    if prepare:
        prepare()
    times = []
    for command in commands:
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def fresh(*folders: Path) -> Callable[[], None]:
    def clean() -> None:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    return clean


def ms(seconds: float) -> str:
    return f"{seconds * 1000:9.2f} ms"


def orthanc_receive(files: list[Path], work: Path) -> float | None:
    """Seconds Orthanc takes to receive `files` from one storescu association (None: no Orthanc)."""
    exe = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
    if exe is None or shutil.which("storescu") is None:
        return None
    dicom_port, http_port = free_port(), free_port()
    config = {"Name": "bench", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "storage"),
              "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "StorageCompression": False,
              "Plugins": []}
    (work / "orthanc.json").write_text(json.dumps(config))
    log = open(work / "orthanc.log", "wb")  # noqa: SIM115 (kept open for the process's lifetime)
    proc = subprocess.Popen([exe, str(work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, env=NODELAY)
    try:
        wait_for(lambda: _http_ok(f"http://127.0.0.1:{http_port}/system"), timeout=30, what="Orthanc")
        start = time.perf_counter()
        subprocess.run(["storescu", "-aec", "ORTHANC", "127.0.0.1", str(dicom_port), *map(str, files)],
                       check=True, env=NODELAY, capture_output=True)
        elapsed = time.perf_counter() - start
        count = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{http_port}/statistics").read())
        assert count["CountInstances"] == len(files), count
        return elapsed
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def storescp_receive(files: list[Path], work: Path) -> float | None:
    """Seconds dcmtk's storescp takes to receive `files` to disk (None: dcmtk missing)."""
    if not (shutil.which("storescp") and shutil.which("storescu") and shutil.which("echoscu")):
        return None
    port = free_port()
    (work / "scp").mkdir()
    proc = subprocess.Popen(["storescp", "-od", str(work / "scp"), str(port)], env=NODELAY,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "127.0.0.1", str(port)], capture_output=True,
                                        check=False).returncode == 0, timeout=20, what="storescp")
        start = time.perf_counter()
        subprocess.run(["storescu", "127.0.0.1", str(port), *map(str, files)], check=True, env=NODELAY,
                       capture_output=True)
        elapsed = time.perf_counter() - start
        assert len(list((work / "scp").iterdir())) == len(files)
        return elapsed
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sag-anon")
    parser.add_argument("--px-files", type=int, default=20, help="files px-repack repacks one process each")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)

    files = sorted(args.data.glob("*.dcm"))
    n = len(files)
    px_script = px_repack()
    # An installed package has its bytecode compiled (pip does it); this checkout may not
    # (PYTHONDONTWRITEBYTECODE), and compiling on every start would be measured otherwise.
    compileall.compile_dir(str(REPO / "dicomflow"), quiet=1)
    from dicomflow.repack.tree import repack_tree  # after compileall, as an installed copy would be

    sys.path.insert(0, str(REPO / "services" / "modules"))
    from repack import worker as service_worker

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"repack benchmark: {n} files of {args.data} ({sum(f.stat().st_size for f in files) / 1e6:.1f} MB), "
        f"{os.cpu_count()} CPUs, {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="repack-bench-") as tmp:
        work = Path(tmp)
        out = work / "out"

        floor = per_process([[PY, "-c", "pass"]] * n)
        px_files = files[:args.px_files]
        px_a = per_process([[str(px_script), "--xcrdir", str(f.parent), "--xcrfile", f.name, "--datadir",
                             str(out / "px" / "data"), "--logdir", str(out / "px" / "log"), "--verbosity", "0"]
                            for f in px_files], fresh(out))
        ours_a = per_process([[PY, "-m", "dicomflow.repack", "--xcrdir", str(f.parent), "--xcrfile", f.name,
                               "--datadir", str(out / "ours" / "data"), "--logdir", str(out / "ours" / "log")]
                              for f in files], fresh(out))
        # The first file of a series also writes the series meta dump (pydicom): shown apart.
        ours_a_rest = ours_a[1:]

        fresh(out)()
        config = {"REPACK_DATADIR": str(out / "svc" / "data"), "REPACK_LOGDIR": str(out / "svc" / "log")}
        service_worker(jobName="repack", headers={}, params={}, added_params={}, dcmpath=str(files[0]),
                       event={}, config=config)  # warm: imports and the once-per-series meta dump
        start = time.perf_counter()
        for f in files:
            service_worker(jobName="repack", headers={}, params={}, added_params={}, dcmpath=str(f), event={},
                           config=config)
        service_b = (time.perf_counter() - start) / n

        fresh(out)()
        inbox = work / "in"
        inbox.mkdir()
        for f in files:
            (inbox / f.name).symlink_to(f)
        start = time.perf_counter()
        subprocess.run([PY, "-m", "dicomflow.repack", "--xcrdir", str(inbox), "--datadir", str(out / "tree" / "data"),
                        "--logdir", str(out / "tree" / "log")], check=True)
        tree_b = (time.perf_counter() - start) / n
        fresh(out)()
        start = time.perf_counter()
        repack_tree(str(inbox), str(out / "tree2" / "data"), str(out / "tree2" / "log"), False,
                    lambda *_: None)
        tree_in_process_b = (time.perf_counter() - start) / n

        fresh(out)()
        start = time.perf_counter()
        subprocess.run([str(px_script), "--xcrdir", str(inbox), "--parseAllFilesWithSubStr", ".dcm", "--datadir",
                        str(out / "pxall" / "data"), "--logdir", str(out / "pxall" / "log"), "--verbosity", "0"],
                       check=True)
        px_one_process = (time.perf_counter() - start) / n

        orthanc_dir = work / "orthanc"
        orthanc_dir.mkdir()
        orthanc = orthanc_receive(files, orthanc_dir)
        scp_dir = work / "storescp"
        scp_dir.mkdir()
        storescp = storescp_receive(files, scp_dir)

    px_per_file = statistics.mean(px_a)
    say()
    say("per file (mean; median in brackets)                     time        vs px-repack -xcr")
    say(f"  python -c pass (the interpreter's floor)         {ms(statistics.mean(floor))} "
        f"({ms(statistics.median(floor)).strip()})")
    say(f"(a) px-repack, one process per file ({len(px_a)} files)     {ms(px_per_file)} "
        f"({ms(statistics.median(px_a)).strip()})        1x")
    say(f"(a) ours, one process per file ({n} files)         {ms(statistics.mean(ours_a))} "
        f"({ms(statistics.median(ours_a)).strip()})   {px_per_file / statistics.mean(ours_a):6.0f}x")
    say(f"    - first file of the series (+ series meta dump)  {ms(ours_a[0])}")
    say(f"    - the other {len(ours_a_rest)} files                          {ms(statistics.mean(ours_a_rest))} "
        f"({ms(statistics.median(ours_a_rest)).strip()})   {px_per_file / statistics.mean(ours_a_rest):6.0f}x")
    above = statistics.median(ours_a) - statistics.median(floor)
    say(f"    - above the floor                                {ms(above)} (medians)")
    say(f"(b) ours, the service's worker function, in-process {ms(service_b)}   {px_per_file / service_b:6.0f}x")
    say(f"(b) ours, whole-folder mode (one command, {n} files) {ms(tree_b)}   {px_per_file / tree_b:6.0f}x")
    say(f"(b) ours, whole-folder mode in-process (no startup) {ms(tree_in_process_b)}   "
        f"{px_per_file / tree_in_process_b:6.0f}x")
    say(f"    px-repack, whole folder in one process           {ms(px_one_process)}   "
        f"{px_per_file / px_one_process:6.0f}x")
    if orthanc is not None:
        say(f"Orthanc 1.10 receiving from storescu (1 assoc.)    {ms(orthanc / n)}")
    else:
        say("Orthanc: not available here")
    if storescp is not None:
        say(f"dcmtk storescp receiving from storescu (1 assoc.)  {ms(storescp / n)}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
