"""Building throw-away services (registry + module folders) for tests."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from dicomflow.settings import Settings

#: The bearer token `settings_for` configures, as a request header.
AUTH = {"Authorization": "Bearer test-token"}

#: A callback that accepts everything and records the instance it saw.
ACCEPT = '''
def callback(jobName, headers, params, added_params, **kwargs):
    return True, {"sop": headers.get("SOPInstanceUID"), "seen": sorted(added_params)}
'''

#: A worker that records its start and end in Redis, so tests can check ordering.
RECORDING_WORKER = '''
import time, json

def worker(jobName, headers, params, added_params, connection=None, **kwargs):
    sop = headers["SOPInstanceUID"]
    connection.rpush("test:log", json.dumps({"job": jobName, "sop": sop, "at": time.time(), "what": "start"}))
    time.sleep(params.get("sleep", 0))
    if params.get("fail"):
        raise RuntimeError(f"{jobName} fails on purpose")
    connection.rpush("test:log", json.dumps({"job": jobName, "sop": sop, "at": time.time(), "what": "end"}))
    return {"job": jobName, "sop": sop, "added_params": added_params}
'''


def make_service(services_dir: Path, name: str, jobs: list[dict[str, Any]] | dict[str, Any] | str,
                 callback_code: str = ACCEPT, worker_code: str = RECORDING_WORKER) -> Path:
    """Install a service folder straight into `services_dir` (registry/NAME + modules/NAME)."""
    registry = services_dir / "registry" / name
    module = services_dir / "modules" / name
    registry.mkdir(parents=True, exist_ok=True)
    module.mkdir(parents=True, exist_ok=True)
    text = jobs if isinstance(jobs, str) else json.dumps(jobs, indent=2)
    (registry / "settings.json").write_text(text)
    (registry / "__init__.py").write_text(textwrap.dedent(callback_code))
    (module / "__init__.py").write_text(textwrap.dedent(worker_code))
    return registry


def job(name: str, package: str, **fields: Any) -> dict[str, Any]:
    """A settings.json job object with the usual defaults."""
    return {"jobName": name, "worker": f"{package}.worker", "callback": f"{package}.callback",
            "priority": "default", **fields}


def settings_for(tmp_path: Path, redis_url: str, services_dir: Path, **extra: str) -> Settings:
    config = {"DICOMFLOW_HOME": str(tmp_path / "home"), "DICOMFLOW_REDIS_URL": redis_url,
              "DICOMFLOW_SERVICES_DIR": str(services_dir), "DICOMFLOW_SCHEDULER_TOKEN": "test-token",
              "DICOMFLOW_REGISTRY_POLL": "0", **extra}
    return Settings.from_config(config)


def instance_event(sop: str, patient: str = "P1", **headers: Any) -> dict[str, Any]:
    """An instance event as the plugin sends it (no Orthanc ids: no dcmpath)."""
    return {"level": "instance", "headers": {"SOPInstanceUID": sop, "PatientID": patient,
                                             "SeriesInstanceUID": "1.2.3", "StudyInstanceUID": "1.2", **headers},
            "orthanc": {}, "remoteAet": "TEST"}
