"""What run.sh leaves in its state folder: Redis's memory limit, and private files (issue 16)."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import requests

from dicomflow.config import parse_env_file
from tests.conftest import REPO
from tests.support.orthanc import NODELAY_ENV, STORESCU, write_series
from tests.support.procs import free_port, wait_for
from tests.support.services import settings_for
from worker.dicomcache import DicomCache


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


def _open_to_others(home: Path) -> list[str]:
    """Everything under `home` that its group or others may read, write or enter."""
    found = []
    for folder, dirs, files in os.walk(home):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                found.append(f"{oct(stat.S_IMODE(mode))} {path.relative_to(home)}")
    return found


def test_everything_in_the_state_folder_is_private(stack, tmp_path):
    values = parse_env_file((stack / "dicomflow.env").read_text())
    # One instance through Orthanc and the plugin, so that storage, spool and logs are written.
    instance = write_series(tmp_path / "dcm", 1, patient_id="STATE01")[0]
    sent = subprocess.run([STORESCU, "-aec", values.get("ORTHANC_AET", "DICOMFLOW"), "127.0.0.1",
                           values["ORTHANC_DICOM_PORT"], str(instance)], env={**os.environ, **NODELAY_ENV},
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    status = lambda: requests.get(f"http://127.0.0.1:{values['ORTHANC_HTTP_PORT']}/dicomflow/status", timeout=5,  # noqa: E731
                                  auth=(values["ORTHANC_USERNAME"], values["ORTHANC_PASSWORD"])).json()
    wait_for(lambda: status()["delivered"] >= 1, timeout=30, what="the event's delivery")
    for made in ("dicomflow.env", "orthanc.json", "redis.conf", "supervisord.conf", "supervisord.pid",
                 "logs/supervisord.log", "logs/scheduler.log", "logs/worker-0.log", "cache/instances"):
        assert (stack / made).exists(), made
    assert _open_to_others(stack) == []
    assert stat.S_IMODE(stack.stat().st_mode) == 0o700


class _Orthanc(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        body = b"DICM" * 100
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_dicom_cache_is_private_whatever_the_workers_umask(tmp_path, redis_url, services):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Orthanc)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    old = os.umask(0o022)  # what run.sh gives the workers, for their services' outputs
    try:
        cache = DicomCache(settings_for(tmp_path, redis_url, services,
                                        ORTHANC_URL=f"http://127.0.0.1:{server.server_port}"))
        ids = ["0123abcd-0123abcd-0123abcd-0123abcd-000000" + n for n in ("01", "02")]
        cache.instance(ids[0])
        folder = cache.folder(ids, "job-1")
        assert sorted(p.name for p in folder.iterdir()) == [f"{i}.dcm" for i in ids]
        assert _open_to_others(cache.root) == []
    finally:
        os.umask(old)
        server.shutdown()
        server.server_close()
