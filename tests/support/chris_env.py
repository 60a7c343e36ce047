"""Helpers the ChRIS tests share: configuration for the CUBE double, events, job arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.cube_double import CubeDouble

SAG_SERIES_UID = "1.3.12.2.1107.5.2.19.45152.2013030808061520200285270.0.0.0"
SAG_FOLDER = ("SERVICES/PACS/OXITESTORTHANC/1449c1d-anonymized-20090701/"
              "MR-Brain_w_o_Contrast-98edede8b2-20130308/00005-SAG_MPRAGE_220_FOV-a27cf06")
AET = "OXITESTORTHANC"


def chris_config(cube: CubeDouble, **extra: str) -> dict[str, str]:
    """A configuration mapping pointing the ChRIS services at `cube`, with fast back-off."""
    config = {
        "CHRIS_URL": cube.url,
        "CHRIS_FILES_ROOT": str(cube.files_root),
        "CHRIS_USERNAME": "chris",
        "CHRIS_PASSWORD": cube.users["chris"],
        "CHRIS_HTTP_RETRIES": "3",
        "CHRIS_RETRY_BASE": "0.01",
        "CHRIS_RETRY_CAP": "0.05",
        "CHRIS_SERIES_WAIT": "10",
    }
    config.update(extra)
    return config


def instance_event(orthanc_id: str, aet: str = AET) -> dict[str, Any]:
    """What a worker receives as `event` for an instance job (CONTRACTS.md)."""
    return {"level": "instance", "orthanc": {"instance": orthanc_id, "series": "s1"},
            "remoteAet": aet, "remoteIp": "127.0.0.1", "calledAet": "DICOMFLOW"}


def series_event(orthanc_ids: list[str], aet: str = AET) -> dict[str, Any]:
    """What a worker receives as `event` for a series job."""
    return {"level": "series", "orthanc": {"series": "s1", "instances": orthanc_ids},
            "remoteAet": aet, "remoteIp": "127.0.0.1", "calledAet": "DICOMFLOW"}


def orthanc_id(path: Path) -> str:
    """A stand-in Orthanc instance id for a test file (its number)."""
    return "oid-" + path.name.split("-", 1)[0]


SERVICE_MODULES = Path(__file__).resolve().parents[2] / "services" / "modules"
SERVICE_REGISTRY = Path(__file__).resolve().parents[2] / "services" / "registry"


def run_service(worker: str, **kwargs: Any) -> Any:
    """RQ job function standing in for the worker runtime: resolve `package.function` and pass
    the job's Redis connection, as docs/CONTRACTS.md says the runtime does."""
    import importlib

    from rq import get_current_job

    module_name, _, function = worker.rpartition(".")
    target = getattr(importlib.import_module(module_name), function)
    return target(connection=get_current_job().connection, **kwargs)


def load_callbacks() -> Any:
    """The ChRIS service's registry package (callbacks), loaded under a private name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chris_registry_callbacks",
                                                  SERVICE_REGISTRY / "chris" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def job_kwargs(job_name: str, dcmpath: Path, event: dict[str, Any], config: dict[str, str],
               headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of a service worker call (docs/CONTRACTS.md), without `connection`."""
    return {"jobName": job_name, "headers": headers or {}, "params": {}, "added_params": {},
            "dcmpath": str(dcmpath), "event": event, "config": config}
