"""The main host's side of workers on other hosts: a password-protected Redis bound to given
addresses, Orthanc reachable from them and counting each file fetch by client address,
and `dicomflow-worker` processes started on a `tests.support.netns.Host` with its own state."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import redis

from dicomflow.orthanc_config import write_config
from tests.support.netns import Host
from tests.support.orthanc import OrthancServer
from tests.support.procs import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]

#: Orthanc's Lua filter sees every HTTP request with the client's address; it logs file fetches.
FETCH_LOGGER = """
function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  if method == 'GET' and string.find(uri, '^/instances/[^/]+/file$') then
    print('dicomflow-fetch ' .. ip .. ' ' .. uri)
  end
  return true
end
"""
_FETCH = re.compile(r"Lua says: dicomflow-fetch (\S+) /instances/([0-9a-f-]+)/file")


class ProtectedRedis:
    """A redis-server requiring a password, listening on loopback and `addresses` only."""

    def __init__(self, folder: Path, addresses: Sequence[str]):
        self.password = secrets.token_urlsafe(16)
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
             "--bind", "127.0.0.1", *addresses, "--requirepass", self.password, "--save", "",
             "--appendonly", "no", "--dir", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url("127.0.0.1"))

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError("the protected redis-server exited") from None
                return False
        wait_for(up, timeout=10, what="the protected redis-server")

    def url(self, address: str) -> str:
        return f"redis://:{self.password}@{address}:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def open_to_hosts(orthanc: OrthancServer, folder: Path) -> None:
    """Let `orthanc` (not started yet) answer other hosts (with its password) and log file fetches.

    Orthanc 1.10 cannot bind to one address: with RemoteAccessAllowed it answers on every
    address of the main namespace; authentication stays on.
    """
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "fetch-logger.lua"
    script.write_text(FETCH_LOGGER)
    orthanc.config["RemoteAccessAllowed"] = True
    orthanc.config["LuaScripts"] = [str(script)]
    write_config(orthanc.config, orthanc.config_path)


def fetches(orthanc: OrthancServer) -> Counter[tuple[str, str]]:
    """How often each (client address, Orthanc instance id) fetched `/instances/{id}/file`."""
    text = orthanc.log_path.read_text(errors="replace")
    return Counter((m[1], m[2]) for m in _FETCH.finditer(text))


def worker_env(host: Host, redis_url: str, orthanc_url: str, orthanc: OrthancServer, services: Path,
               **extra: str) -> dict[str, str]:
    """The environment of a worker on `host`: its own home and services copy, nothing of ours."""
    own_services = host.folder / "services"
    if not own_services.exists():
        shutil.copytree(services, own_services)  # "install the same services" on that host
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DICOMFLOW_", "ORTHANC_"))}
    return {**base, "DICOMFLOW_CONFIG": "", "DICOMFLOW_HOME": str(host.folder / "home"),
            "DICOMFLOW_SERVICES_DIR": str(own_services), "DICOMFLOW_REDIS_URL": redis_url,
            "ORTHANC_URL": orthanc_url, "ORTHANC_USERNAME": orthanc.username,
            "ORTHANC_PASSWORD": orthanc.password, "PYTHONPATH": str(REPO), "TCP_NODELAY": "1", **extra}


def start_workers(host: Host, env: dict[str, str], count: int) -> list[str]:
    """`count` dicomflow-worker processes on `host`, named `<namespace>-w<n>`; their names."""
    names = []
    for n in range(count):
        name = f"{host.name}-w{n}"
        host.popen([sys.executable, "-m", "worker.cli", "--name", name], env=env,
                   log=host.folder / f"worker-{n}.log", cwd=REPO)
        names.append(name)
    return names
