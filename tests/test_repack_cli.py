"""The repack command as a real process: rx-repack's options, the tree mode, storescp's -xcr hook."""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dicomflow.repack.cli import main
from tests.support.procs import free_port, wait_for
from tests.support.repack_dicom import make_instance

COMMAND = [sys.executable, "-m", "dicomflow.repack"]


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *args], capture_output=True, text=True, timeout=60, check=False, **kwargs)


def test_one_file_prints_rx_repacks_ndjson_line(tmp_path):
    src = make_instance(tmp_path / "in" / "x.dcm", PatientID="P1", PerformedStationAETitle=None)
    done = run_cli("--xcrdir", str(src.parent), "--xcrfile", src.name, "--datadir", str(tmp_path / "data"),
                   "--logdir", str(tmp_path / "log"), "--verbosity", "0", "-l")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    line = json.loads(done.stdout)
    assert list(line) == ["src", "dst", "size", "PatientID", "SeriesInstanceUID", "missing"]
    assert line["src"] == str(src) and line["PatientID"] == "P1"
    assert Path(line["dst"]).read_bytes() == src.read_bytes() and line["size"] == src.stat().st_size
    assert line["missing"] == [{"tag": "(0040,0241)", "name": "PerformedStationAETitle",
                                "error": "no such element"}]
    assert src.exists()


def test_without_log_ndjson_it_is_silent(tmp_path):
    src = make_instance(tmp_path / "x.dcm")
    done = run_cli("--xcrdir", str(tmp_path), "--xcrfile", src.name, "--datadir", str(tmp_path / "data"))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_cleanup_moves_the_file(tmp_path):
    src = make_instance(tmp_path / "in" / "x.dcm")
    data = src.read_bytes()
    done = run_cli("--xcrdir", str(src.parent), "--xcrfile", src.name, "--datadir", str(tmp_path / "data"),
                   "--logdir", str(tmp_path / "log"), "--cleanup", "--log-ndjson")
    assert done.returncode == 0, done.stderr
    assert not src.exists()
    assert Path(json.loads(done.stdout)["dst"]).read_bytes() == data


def test_tree_mode_repacks_every_file_and_skips_its_own_output(tmp_path):
    inbox = tmp_path / "in"
    for i in range(3):
        make_instance(inbox / f"d{i}" / f"{i}.dcm", study_uid="1.2.5", series_uid="1.2.5.1", InstanceNumber=str(i))
    data = inbox / "out-data"  # inside the tree on purpose
    done = run_cli("--xcrdir", str(inbox), "--datadir", str(data), "--logdir", str(tmp_path / "log"), "-l")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 3
    assert sorted(p.name[:4] for p in data.rglob("*.dcm")) == ["0000", "0001", "0002"]
    assert done.stderr == ""  # no progress bar when stderr is not a terminal
    again = run_cli("--xcrdir", str(inbox), "--datadir", str(data), "-l")
    assert len(again.stdout.splitlines()) == 3  # the output folder is not repacked into itself


def test_tree_mode_draws_a_progress_bar_on_a_terminal(tmp_path):
    for i in range(4):
        make_instance(tmp_path / "in" / f"{i}.dcm")
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*COMMAND, "--xcrdir", str(tmp_path / "in"), "--datadir", str(tmp_path / "data")],
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(60) == 0
    assert b"100% [########################################] 4/4" in output


def test_help_and_usage_errors(tmp_path):
    assert run_cli("--help").stdout.startswith("usage: python -m dicomflow.repack --xcrdir DIR")
    missing = run_cli("--xcrdir", str(tmp_path))
    assert missing.returncode == 2 and "--datadir is required" in missing.stderr
    unknown = run_cli("--xcrdir", str(tmp_path), "--datadir", str(tmp_path), "--bogus")
    assert unknown.returncode == 2 and "option --bogus not recognized" in unknown.stderr
    assert main(["--xcrdir", str(tmp_path), "--datadir", str(tmp_path), "--verbosity", "x"]) == 2
    assert main(["--xcrdir", str(tmp_path / "nowhere"), "--datadir", str(tmp_path)]) == 1


def test_main_in_process(tmp_path, capsys):
    src = make_instance(tmp_path / "x.dcm")
    assert main(["--xcrdir", str(tmp_path), "--xcrfile", "x.dcm", "--datadir", str(tmp_path / "data"), "-l"]) == 0
    assert json.loads(capsys.readouterr().out)["src"] == str(src)


@pytest.mark.skipif(not (shutil.which("storescp") and shutil.which("storescu")), reason="dcmtk not installed")
def test_as_storescps_exec_on_reception_hook(tmp_path, sag_anon):
    sources = sorted(sag_anon.glob("*.dcm"))[:3]
    port = free_port()
    incoming, data, log = tmp_path / "incoming", tmp_path / "data", tmp_path / "log"
    incoming.mkdir()
    # As docs/readme/repack.md shows it: -uf, so that #f is a name storescp generates, not a UID sent by the peer.
    hook = (f"{sys.executable} -m dicomflow.repack --xcrdir '#p' --xcrfile '#f' --datadir {data} --logdir {log} "
            f"--cleanup")
    scp = subprocess.Popen(["storescp", "--exec-sync", "-uf", "-od", str(incoming), "-xcr", hook, str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        wait_for(lambda: subprocess.run(["echoscu", "127.0.0.1", str(port)], capture_output=True,
                                        check=False).returncode == 0, timeout=20, what="storescp")
        sent = subprocess.run(["storescu", "127.0.0.1", str(port), *map(str, sources)], capture_output=True,
                              text=True, timeout=60, check=False, env={**os.environ, "TCP_NODELAY": "1"})
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(list(data.rglob("*.dcm"))) == 3 and not list(incoming.iterdir()), timeout=30,
                 what="three repacked files")
    finally:
        scp.terminate()
        scp.wait(10)
    assert sorted(p.name for p in data.rglob("*.dcm")) == [p.name for p in sources]
    assert (log / "patientData" / "1449c1d.json").is_file()
