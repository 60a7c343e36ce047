"""`dicomflow-redis`: each command with CliRunner, a killed load resumed, and a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter

import pydicom
import pytest
import redis
from click.testing import CliRunner

from dicomflow.redisstore import RedisStore
from dicomflow.redisstore.cli import cli
from tests.conftest import REPO
from tests.support.procs import wait_for


@pytest.fixture()
def run(store_url):
    redis.Redis.from_url(store_url).flushall()
    runner = CliRunner()

    def invoke(*args: str, env: dict | None = None):
        return runner.invoke(cli, list(args), env={"DICOMFLOW_CONFIG": "", "REDIS_STORE_URL": store_url,
                                                   "DICOMFLOW_REDIS_URL": "", **(env or {})})
    return invoke


def test_load_is_resumable_and_reports_what_is_not_dicom(run, sag_anon, sag_anon_count, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(sag_anon, folder, ignore=shutil.ignore_patterns("*.md", "LICENSE*"))
    (folder / "README.md").write_text("not DICOM")
    first = run("load", str(folder), "--no-progress")
    assert first.exit_code == 0, first.output
    assert f"{sag_anon_count} stored" in first.output and "README.md: not a readable DICOM file" in first.output
    again = run("load", str(folder))
    assert again.exit_code == 0 and f"{sag_anon_count} skipped, 1 not DICOM" in again.output


def test_the_three_scenarios_and_the_other_commands(run, sag_anon, tmp_path, store_url):
    assert run("load", str(sag_anon)).exit_code == 0
    files = sorted(sag_anon.glob("*.dcm"))
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    # 1. the bytes of a file by name
    out = tmp_path / "one.dcm"
    got = run("get", "--file", files[3].name, "-o", str(out))
    assert got.exit_code == 0, got.output
    assert out.read_bytes() == files[3].read_bytes()
    stdout = run("get", str(datasets[3].SOPInstanceUID))
    assert stdout.stdout_bytes == files[3].read_bytes()
    # 2. the files with ProtocolName X and StudyDate in a year, with their bytes
    protocol, year = str(datasets[0].ProtocolName), str(datasets[0].StudyDate)[:4]
    found = run("find", f"ProtocolName={protocol}", "--range", f"StudyDate={year}", "--with-bytes",
                str(tmp_path / "hits"), "--json")
    assert found.exit_code == 0, found.output
    docs = [json.loads(line) for line in found.stdout.splitlines()]
    assert len(docs) == sum(1 for d in datasets if str(d.ProtocolName) == protocol)
    assert all((tmp_path / "hits" / d["file_name"]).read_bytes() == (sag_anon / d["file_name"]).read_bytes()
               for d in docs)
    assert run("find", f"ProtocolName={protocol}", "--range", "StudyDate=1990-1999").exit_code == 1
    # 3. counts per protocol
    counted = run("count", "--by", "ProtocolName", "--json")
    assert json.loads(counted.stdout) == dict(Counter(str(d.ProtocolName) for d in datasets))
    # delete, stats, errors
    assert run("delete", "--file", files[0].name).exit_code == 0
    assert run("get", "--file", files[0].name).exit_code == 1
    assert "no stored instance" in run("get", "--file", files[0].name).output
    assert run("delete", "1.2.3.nothing").exit_code == 1
    stats = json.loads(run("stats", "--json").stdout)
    assert stats["instances"] == len(files) - 1 and stats["bytes"] == sum(p.stat().st_size for p in files[1:])
    assert run("find", "Rows=256").exit_code == 2  # not an indexed field: a usage error
    assert run("get").exit_code == 2


def test_the_queue_database_is_refused(run, redis_url):
    result = run("stats", env={"REDIS_STORE_URL": redis_url, "DICOMFLOW_REDIS_URL": redis_url})
    assert result.exit_code == 1 and "job queue's own Redis database" in result.output
    allowed = run("--allow-queue-db", "stats", env={"REDIS_STORE_URL": redis_url, "DICOMFLOW_REDIS_URL": redis_url})
    assert allowed.exit_code == 0, allowed.output
    assert run("stats", env={"REDIS_STORE_URL": ""}).exit_code == 2


def test_a_load_killed_halfway_shows_no_partial_instance_and_the_next_completes_it(store_url, sag_anon, tmp_path):
    client = redis.Redis.from_url(store_url)
    client.flushall()
    folder = tmp_path / "big"
    folder.mkdir()
    sources = sorted(sag_anon.glob("*.dcm"))[:40]
    for source in sources:  # files of 2 MiB+: 8+ chunks each at 256 KiB
        (folder / source.name).write_bytes(source.read_bytes() + os.urandom(2 << 20))
    env = {**os.environ, "DICOMFLOW_CONFIG": "", "REDIS_STORE_URL": store_url, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "dicomflow.redisstore", "load", str(folder), "-j", "4"]
    proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    store = RedisStore(client)
    wait_for(lambda: store.stats()["instances"] >= len(sources) // 4, timeout=60, what="a quarter loaded")
    os.killpg(proc.pid, signal.SIGKILL)  # the command and its worker processes, as a killed terminal would
    proc.wait(10)
    wait_for(lambda: not _group_alive(proc.pid), timeout=10, what="the load's processes to die")
    total, found = store.find(with_bytes=True)  # verifies size and SHA-256 of everything visible
    assert len(sources) // 4 <= total < len(sources) and len(found) == total
    finished = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert f"{total} skipped" in finished.stdout
    total, found = store.find(with_bytes=True)
    assert total == len(sources)
    assert all(f.data == (folder / f.file_name).read_bytes() for f in found)


def test_bench_reads_a_generated_file_back_and_cleans_up(run, store_url):
    result = run("bench", "--size-mb", "8", "--chunk-kb", "256", "--connections", "1,4")
    assert result.exit_code == 0, result.output
    assert "chunk 256 KiB: 1 conn" in result.output and "4 conn" in result.output
    assert list(redis.Redis.from_url(store_url).scan_iter("dicomflow-bench:*")) == []
    assert run("bench", "--connections", "0").exit_code == 2


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_the_installed_command_answers_help():
    exe = shutil.which("dicomflow-redis", path=os.path.dirname(sys.executable))
    assert exe, "dicomflow-redis is not installed: pip install -e ."
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "load" in result.stdout
    result = subprocess.run([exe, "get", "--nope"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
