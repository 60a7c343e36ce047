"""Starting a real redis-server of a test's own on a free port (never the machine's Redis)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import redis

from tests.support.procs import free_port, wait_for


def start_redis_server(folder: Path, *extra: str, what: str = "redis-server") -> tuple[subprocess.Popen, str]:
    """A redis-server keeping nothing on disk, its files in `folder`; `extra` are more options.

    The server is `$TEST_REDIS_SERVER` when set (another build: a Valkey or Redis 8 `*-server`),
    else the `redis-server` on the PATH. Returns the process and its URL once it answers PING.
    """
    exe = os.environ.get("TEST_REDIS_SERVER") or shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed: run .ci/run or build.sh first")
    port = free_port()
    Path(folder).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
    wait_for(up, timeout=10, what=what)
    return proc, url


def stop_redis_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(10)
