"""The repack service: its settings.json, callback and worker, loaded from their folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dicomflow.errors import ConfigError
from tests.support.repack_dicom import make_instance

REPO = Path(__file__).resolve().parent.parent
REGISTRY = REPO / "services" / "registry" / "repack"
MODULE = REPO / "services" / "modules" / "repack"


def load(folder: Path, name: str):
    """Import the package in `folder` under `name` (both sides call themselves ``repack``)."""
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_json():
    settings = json.loads((REGISTRY / "settings.json").read_text())
    assert settings == {
        "jobName": "repack", "worker": "repack.worker", "callback": "repack.callback", "priority": "default",
        "timeout": "10m", "params": {}, "sortPosition": 100, "description": settings["description"],
        "triggerLevel": "instance", "requiresConfig": ["REPACK_DATADIR"]}
    assert "pypx" in settings["description"]


def test_callback_runs_for_every_instance():
    callback = load(REGISTRY, "repack_registry_under_test").callback
    assert callback(jobName="repack", headers={"SOPInstanceUID": "1.2"}, params={}, added_params={},
                    event={"level": "instance"}, config={"REPACK_DATADIR": "/data"}) is True


def test_worker_repacks_a_copy_and_returns_a_small_result(tmp_path):
    worker = load(MODULE, "repack_module_under_test").worker
    src = make_instance(tmp_path / "cache" / "abc.dcm", PatientID="P9", PatientAge=None)
    config = {"REPACK_DATADIR": str(tmp_path / "data"), "REPACK_LOGDIR": str(tmp_path / "log"), "OTHER": "x"}
    result = worker(jobName="repack", headers={}, params={}, added_params={}, dcmpath=str(src),
                    event={"level": "instance"}, config=config, connection=None)
    assert set(result) == {"dst", "size", "missing"}
    assert Path(result["dst"]).read_bytes() == src.read_bytes() and src.exists()
    assert result["size"] == src.stat().st_size
    assert result["missing"] == [{"tag": "(0010,1010)", "name": "PatientAge", "error": "no such element"}]
    assert (tmp_path / "log" / "patientData" / "P9.json").is_file()
    json.dumps(result)  # storable as an RQ job result


def test_worker_without_logdir_writes_no_logs(tmp_path):
    worker = load(MODULE, "repack_module_under_test2").worker
    src = make_instance(tmp_path / "abc.dcm")
    worker(jobName="repack", headers={}, params={}, added_params={}, dcmpath=src, event={},
           config={"REPACK_DATADIR": str(tmp_path / "data"), "REPACK_LOGDIR": ""}, connection=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc.dcm", "data"]


@pytest.mark.parametrize("config", [{}, {"REPACK_DATADIR": "  "}])
def test_worker_without_datadir_is_a_config_error(tmp_path, config):
    worker = load(MODULE, "repack_module_under_test3").worker
    with pytest.raises(ConfigError, match="REPACK_DATADIR"):
        worker(jobName="repack", headers={}, params={}, added_params={}, dcmpath=str(tmp_path / "x.dcm"),
               event={}, config=config, connection=None)


def test_worker_records_each_series_progress_for_the_status_page(tmp_path, connection):
    from dicomflow.repack.progress import recent_series, series_progress

    worker = load(MODULE, "repack_module_under_test4").worker
    config = {"REPACK_DATADIR": str(tmp_path / "data"), "REPACK_LOGDIR": ""}
    for n in range(3):
        src = make_instance(tmp_path / "cache" / f"{n}.dcm", SeriesInstanceUID="1.2.840.99", InstanceNumber=n + 1)
        result = worker(jobName="repack", headers={"SeriesInstanceUID": "1.2.840.99"}, params={}, added_params={},
                        dcmpath=str(src), event={}, config=config, connection=connection)
    broken = tmp_path / "cache" / "broken.dcm"
    broken.write_bytes(b"not DICOM at all")
    with pytest.raises(Exception, match="broken.dcm"):
        worker(jobName="repack", headers={"SeriesInstanceUID": "1.2.840.99"}, params={}, added_params={},
               dcmpath=str(broken), event={}, config=config, connection=connection)
    found = series_progress(connection, "1.2.840.99")
    assert found["repacked"] == 3 and found["failed"] == 1 and "broken.dcm" in found["lastError"]
    assert found["folder"] == str(Path(result["dst"]).parent)
    assert [s["SeriesInstanceUID"] for s in recent_series(connection)] == ["1.2.840.99"]
