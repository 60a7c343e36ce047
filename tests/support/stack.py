"""The whole pipeline for end-to-end tests: real scheduler (gunicorn), real workers, real Orthanc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import requests

from tests.support.orthanc import OrthancServer
from tests.support.procs import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
TOKEN = "e2e-token"


class Pipeline:
    """Scheduler + N workers (+ Orthanc with the plugin pointed at the scheduler) in `folder`."""

    def __init__(self, folder: Path, redis_url: str, services_dir: Path, *, workers: int = 2,
                 stable_age: int = 60, extra_config: dict[str, str] | None = None,
                 plugin_options: dict | None = None):
        self.folder = folder
        self.port = free_port()
        self.scheduler_url = f"http://127.0.0.1:{self.port}"
        self.orthanc = OrthancServer(folder / "orthanc", scheduler_url=self.scheduler_url, token=TOKEN,
                                     stable_age=stable_age,
                                     plugin_options={"RetryMaxDelay": 1.0, **(plugin_options or {})})
        self.env = {**os.environ, "DICOMFLOW_CONFIG": "", "DICOMFLOW_REDIS_URL": redis_url,
                    "DICOMFLOW_SERVICES_DIR": str(services_dir), "DICOMFLOW_HOME": str(folder / "home"),
                    "DICOMFLOW_SCHEDULER_TOKEN": TOKEN, "DICOMFLOW_SCHEDULER_PORT": str(self.port),
                    "DICOMFLOW_REGISTRY_POLL": "0.5", "ORTHANC_URL": self.orthanc.url,
                    "ORTHANC_USERNAME": self.orthanc.username, "ORTHANC_PASSWORD": self.orthanc.password,
                    "ORTHANC_STABLE_AGE": str(stable_age), "DICOMFLOW_PUSH_POLL": "0.2",
                    "PYTHONPATH": str(REPO), "TCP_NODELAY": "1", **(extra_config or {})}
        self.worker_count = workers
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {TOKEN}"

    def start_scheduler(self) -> None:
        log = open(self.folder / "scheduler.log", "ab")
        self.scheduler = subprocess.Popen([sys.executable, "-m", "scheduler.cli", "--threads", "4"], env=self.env,
                                          cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._scheduler_up, timeout=30, what="the scheduler")

    def _scheduler_up(self) -> bool:
        if self.scheduler.poll() is not None:
            raise RuntimeError((self.folder / "scheduler.log").read_text()[-3000:])
        try:
            return self.session.get(self.scheduler_url + "/health", timeout=1).ok
        except requests.RequestException:
            return False

    def stop_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.terminate()
            self.scheduler.wait(20)
            self.scheduler = None

    def start(self) -> Pipeline:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.start_scheduler()
        for n in range(self.worker_count):
            log = open(self.folder / f"worker-{n}.log", "ab")
            self.workers.append(subprocess.Popen([sys.executable, "-m", "worker.cli"], env=self.env, cwd=REPO,
                                                 stdout=log, stderr=subprocess.STDOUT))
        self.orthanc.start()
        return self

    def stop(self) -> None:
        self.orthanc.stop()
        for proc in self.workers:
            proc.terminate()
        for proc in self.workers:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.workers = []
        self.stop_scheduler()

    def api(self, path: str) -> dict:
        response = self.session.get(self.scheduler_url + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def diagnostics(stack: Pipeline) -> str:
    """Plugin counters and scheduler counters, for a failing test's message."""
    parts = []
    try:
        parts.append(f"plugin: {stack.orthanc.status()}")
    except Exception as exc:  # noqa: BLE001 - diagnostics must not hide the real failure
        parts.append(f"plugin status unavailable: {exc}")
    try:
        parts.append(f"scheduler: {stack.api('/api/v1/stats')}")
        parts.append(f"errors: {stack.api('/api/v1/errors')}")
    except Exception as exc:  # noqa: BLE001 - idem
        parts.append(f"scheduler unavailable: {exc}")
    return "\n".join(parts)
