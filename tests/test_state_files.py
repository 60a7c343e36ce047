"""What run.sh leaves in its state folder: Redis's memory limit, and private files (issue 16)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import redis

from dicomflow.config import parse_env_file
from tests.conftest import REPO
from tests.support.procs import free_port


def run_sh(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "DICOMFLOW_HOME": str(home), "DICOMFLOW_NATIVE": "1", **env}
    full.pop("DICOMFLOW_CONFIG", None)
    return subprocess.run(["bash", str(REPO / "run.sh"), *args], env=full, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The stack as run.sh starts it (one worker), in a state folder of its own; stopped after."""
    home = tmp_path_factory.mktemp("runsh") / "state"
    ports = {name: str(free_port()) for name in ("DICOMFLOW_REDIS_PORT", "DICOMFLOW_SCHEDULER_PORT",
                                                 "DICOMFLOW_DASHBOARD_PORT", "ORTHANC_HTTP_PORT", "ORTHANC_DICOM_PORT")}
    try:
        started = run_sh(home, "--workers", "1", **ports)
        assert started.returncode == 0, started.stdout + started.stderr
        yield home
    finally:
        stopped = run_sh(home, "stop")
        assert stopped.returncode == 0, stopped.stderr


def _quarter_of_ram() -> str:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        kb = next(int(line.split()[1]) for line in meminfo if line.startswith("MemTotal:"))
    return f"{kb // 4 // 1024}mb"


def test_redis_has_a_memory_limit_and_never_evicts(stack):
    conf = (stack / "redis.conf").read_text().splitlines()
    limit = _quarter_of_ram()
    assert f"maxmemory {limit}" in conf and "maxmemory-policy noeviction" in conf
    values = parse_env_file((stack / "dicomflow.env").read_text())
    client = redis.Redis.from_url(values["DICOMFLOW_REDIS_URL"])
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    assert client.config_get("maxmemory") == {"maxmemory": str(int(limit[:-2]) << 20)}


def test_a_malformed_redis_memory_limit_stops_run_sh_before_anything_starts(tmp_path):
    try:
        done = run_sh(tmp_path / "state", DICOMFLOW_REDIS_MAXMEMORY="lots", DICOMFLOW_REDIS_PORT=str(free_port()))
    finally:
        run_sh(tmp_path / "state", "stop")  # should it have started after all
    assert done.returncode != 0 and "DICOMFLOW_REDIS_MAXMEMORY" in done.stderr
    assert not (tmp_path / "state" / "redis.conf").exists()
    assert not (tmp_path / "state" / "supervisord.pid").exists()
