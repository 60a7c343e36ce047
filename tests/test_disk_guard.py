"""The plugin's disk guard (a free-space watermark) and its opt-in retention policy.

Unit tests drive `orthanc/dicomflow_disk.py` with a fake statvfs and a fake Orthanc API; the
end-to-end tests run the real Orthanc with the real plugin on a 20 MB tmpfs (mounting it needs
root) and send with dcmtk's storescu.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from dicomflow.orthanc_config import OrthancSettings, render_orthanc_config
from tests.support.orthanc import NODELAY_ENV, STORESCU, OrthancServer, write_series
from tests.support.orthanc_fixtures import FAST_RETRY
from tests.support.procs import wait_for

ORTHANC_DIR = Path(__file__).resolve().parent.parent / "orthanc"
if str(ORTHANC_DIR) not in sys.path:
    sys.path.insert(0, str(ORTHANC_DIR))

import dicomflow_disk as disk  # noqa: E402 - the plugin's folder, put on the path above
from dicomflow_spool import Spool  # noqa: E402

MB = 1024 * 1024


# ---- the settings ----------------------------------------------------------------------------


@pytest.fixture()
def plugin_module(monkeypatch):
    """orthanc/dicomflow_plugin.py imported with a stand-in `orthanc` module (its install() then
    finds no "Dicomflow" section and does nothing)."""
    fake = types.ModuleType("orthanc")
    fake.GetConfiguration = lambda: "{}"
    fake.LogError = fake.LogWarning = fake.LogInfo = lambda message: None
    monkeypatch.setitem(sys.modules, "orthanc", fake)
    monkeypatch.delitem(sys.modules, "dicomflow_plugin", raising=False)
    module = importlib.import_module("dicomflow_plugin")
    yield module
    sys.modules.pop("dicomflow_plugin", None)


def _configuration(**section):
    return {"StorageDirectory": "/srv/orthanc/storage", "IndexDirectory": "/srv/orthanc/index",
            "Dicomflow": {"SchedulerUrl": "http://127.0.0.1:8642", "SpoolPath": "/tmp/spool.sqlite", **section}}


def test_settings_defaults_guard_on_retention_off(plugin_module):
    settings = plugin_module.PluginSettings.from_configuration(_configuration())
    assert settings.min_free_space_mb == 1024.0 and settings.disk_check_interval == 1.0
    assert settings.retention_days == 0.0 and settings.retention_interval == 3600.0
    assert settings.storage_paths == ("/srv/orthanc/storage", "/srv/orthanc/index")


def test_settings_parse_and_validate(plugin_module):
    parse = plugin_module.PluginSettings.from_configuration
    settings = parse(_configuration(MinFreeSpaceMB=0, RetentionDays="0.5", RetentionInterval=2, DiskCheckInterval=0.25))
    assert (settings.min_free_space_mb, settings.retention_days) == (0.0, 0.5)
    assert (settings.retention_interval, settings.disk_check_interval) == (2.0, 0.25)
    for bad in ({"MinFreeSpaceMB": -1}, {"RetentionDays": "soon"}, {"RetentionInterval": 0},
                {"DiskCheckInterval": 0}, {"MinFreeSpaceMB": True}, {"RetentionDays": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            parse(_configuration(**bad))
    # Orthanc's defaults: "OrthancStorage" in its working directory, the index beside the files.
    assert disk.storage_paths({}, cwd="/var/lib/orthanc") == ("/var/lib/orthanc/OrthancStorage",)


def test_generated_configuration_passes_the_settings_through():
    base = {"DICOMFLOW_HOME": "/srv/df", "ORTHANC_PASSWORD": "pw"}
    section = render_orthanc_config(OrthancSettings.from_config(base), scheduler_url="http://x", token="t")["Dicomflow"]
    assert (section["MinFreeSpaceMB"], section["RetentionDays"]) == (1024.0, 0.0)
    custom = OrthancSettings.from_config({**base, "ORTHANC_MIN_FREE_SPACE_MB": "0", "ORTHANC_RETENTION_DAYS": "30"})
    section = render_orthanc_config(custom, scheduler_url="http://x", token="t")["Dicomflow"]
    assert (section["MinFreeSpaceMB"], section["RetentionDays"]) == (0.0, 30.0)


# ---- the guard, unit -------------------------------------------------------------------------


class FakeDisk:
    """statvfs of a filesystem whose free space the test sets."""

    def __init__(self, free: int):
        self.free = free
        self.calls = 0

    def __call__(self, path: str) -> SimpleNamespace:
        self.calls += 1
        return SimpleNamespace(f_bavail=self.free // 4096, f_frsize=4096)


class Instance:
    def __init__(self, size: int):
        self.size = size

    def GetInstanceSize(self) -> int:  # noqa: N802 - Orthanc's name
        return self.size


def test_filter_counts_accepted_bytes_between_samples_and_refuses_under_the_watermark(tmp_path):
    fake, logs = FakeDisk(20 * MB), []
    guard = disk.DiskGuard([str(tmp_path)], 10 * MB, log=logs.append, statvfs=fake)
    guard.sample()
    calls = fake.calls
    answers = [guard.cstore_filter(Instance(MB)) for _ in range(13)]
    # 10 MB above the watermark: the eleventh instance is the one that crosses it, the last stored.
    assert answers == [disk.ACCEPT] * 11 + [disk.OUT_OF_RESOURCES] * 2
    assert fake.calls == calls, "the filter must not measure the disk"
    assert guard.refusing and guard.refused == 2 and "under the watermark MinFreeSpaceMB=10" in guard.reason
    assert any("refusing C-STOREs" in line for line in logs)
    # REST uploads are refused too while refusing; reads are not.
    assert guard.http_filter("/instances", method=2) is False
    assert guard.http_filter("/dicom-web/studies", method=2) is False
    assert guard.http_filter("/instances", method=1) is True
    assert guard.http_filter("/dicomflow/status", method=1) is True
    # The disk did fill: the sample agrees. Freed to just over the watermark: still refusing (margin).
    fake.free = 10 * MB - 1
    guard.sample()
    assert guard.refusing
    fake.free = 10 * MB + 4096
    guard.sample()
    assert guard.refusing and "not yet the 10.5 MB to resume" in guard.reason
    fake.free = 15 * MB
    guard.sample()
    assert not guard.refusing and guard.cstore_filter(Instance(MB)) == disk.ACCEPT
    assert guard.http_filter("/instances", method=2) is True
    assert "accepting instances again" in logs[-1]
    status = guard.status()
    assert status["freeBytes"] == 15 * MB and status["estimatedFreeBytes"] == 14 * MB
    assert status["minFreeBytes"] == 10 * MB and status["refused"] == 4  # 2 C-STOREs, 2 uploads


def test_free_space_of_the_fullest_filesystem_and_of_a_folder_not_yet_made(tmp_path):
    free = disk.free_bytes([str(tmp_path / "not" / "yet")])
    stats = os.statvfs(tmp_path)
    assert abs(free - stats.f_bavail * stats.f_frsize) < 64 * MB
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    sizes = {str(tmp_path / "a"): 5 * MB, str(tmp_path / "b"): 3 * MB}
    assert disk.free_bytes(sizes, lambda p: SimpleNamespace(f_bavail=sizes[p], f_frsize=1)) == 3 * MB


# ---- retention, unit -------------------------------------------------------------------------


class FakeOrthanc:
    """Orthanc's REST API as retention uses it: pages of /studies?expand, instances, DELETE."""

    def __init__(self, studies: dict[str, float]):
        self.studies = {sid: {"ID": sid, "Series": [sid + "-s"], "LastUpdate":
                              time.strftime("%Y%m%dT%H%M%S", time.gmtime(updated))}
                        for sid, updated in studies.items()}
        self.deleted: list[str] = []
        self.gets = 0

    def RestApiGet(self, uri: str) -> bytes:  # noqa: N802 - Orthanc's name
        self.gets += 1
        if uri.startswith("/studies?"):
            args = dict(part.partition("=")[::2] for part in uri.split("?")[1].split("&"))
            ordered = list(self.studies.values())
            since, limit = int(args["since"]), int(args["limit"])
            return json.dumps(ordered[since:since + limit]).encode()
        study = uri.split("/")[2]
        return json.dumps([{"ID": study + "-i"}]).encode()

    def RestApiDelete(self, uri: str) -> None:  # noqa: N802 - Orthanc's name
        study = uri.rsplit("/", 1)[1]
        del self.studies[study]
        self.deleted.append(study)


def test_retention_deletes_old_studies_but_recent_undelivered_or_unfinished_ones(monkeypatch):
    monkeypatch.setattr(disk, "RETENTION_PAGE", 3)  # several pages, with deletions shifting them
    monkeypatch.setattr(disk, "RETENTION_PAUSE", 0)
    now = 1_700_000_000.0
    ages = {f"old{i}": now - 3 * 86400 for i in range(7)} | {"recent": now - 3600, "spooled": now - 9 * 86400,
                                                               "queued": now - 9 * 86400, "busy": now - 9 * 86400}
    api = FakeOrthanc(ages)
    pending = ({"spooled"}, {"queued-i"})
    retention = disk.Retention(api, 2 * 86400, 3600, lambda: pending,
                               finished=lambda study: study["ID"] != "busy", log=lambda m: None, clock=lambda: now)
    assert retention.run_once() == 7
    assert sorted(api.deleted) == [f"old{i}" for i in range(7)]
    assert sorted(api.studies) == ["busy", "queued", "recent", "spooled"]
    status = retention.status()
    assert status["keptUndelivered"] == 2 and status["keptUnfinished"] == 1 and status["passes"] == 1


def test_spooled_ids_name_the_studies_of_spooled_and_dead_events(tmp_path):
    spool = Spool(str(tmp_path / "spool.sqlite"))
    spool.append([(1, json.dumps({"level": "instance", "orthanc": {"instance": "i1", "study": "st1"}})),
                  (2, json.dumps({"level": "series", "orthanc": {"series": "se2", "study": "st2"}}))])
    spool.bury([(3, json.dumps({"unprocessed": [3, "instance", "i3", None]}))], 422, "refused")
    try:
        assert disk.spooled_ids(str(tmp_path / "spool.sqlite")) == ({"st1", "st2"}, {"i3"})
    finally:
        spool.close()
    assert disk.spooled_ids(str(tmp_path / "none.sqlite")) == (set(), set())


# ---- end to end: the real Orthanc on a small filesystem -------------------------------------


@pytest.fixture()
def small_fs(tmp_path) -> Iterator[Path]:
    """A 20 MB tmpfs, unmounted afterwards."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)




def _on(mount: Path) -> dict[str, str]:
    return {"StorageDirectory": str(mount / "storage"), "IndexDirectory": str(mount / "storage")}


def _storescu(server: OrthancServer, files: list[Path]) -> tuple[int, str]:
    """Send over one association with verbose output; (exit code, output)."""
    done = subprocess.run([STORESCU, "-v", "-aet", "STORESCU", "-aec", server.aet, "127.0.0.1",
                           str(server.dicom_port), *map(str, files)],
                          env={**os.environ, **NODELAY_ENV}, capture_output=True, text=True, timeout=120, check=False)
    return done.returncode, done.stdout + done.stderr


def _instance_count(server: OrthancServer) -> int:
    return server.get("/statistics")["CountInstances"]


def test_watermark_refuses_c_store_before_the_disk_fills_and_resumes_when_space_is_freed(tmp_path, small_fs,
                                                                                         servers):
    files = write_series(tmp_path / "dcm", 30, rows=512, columns=512, patient_id="DISK001")  # ~0.5 MB each
    server = OrthancServer(tmp_path / "orthanc", plugin_options={"MinFreeSpaceMB": 10, **FAST_RETRY},
                           extra=_on(small_fs))
    servers.append(server.start())
    assert server.status()["disk"]["minFreeBytes"] == 10 * MB

    code, output = _storescu(server, files)
    accepted = output.count("Received Store Response (Success)")
    refused = output.count("Received Store Response (Refused: OutOfResources)")
    # storescu gives up the association at the first refusal (and exits non-zero).
    assert code != 0 and refused == 1 and 5 <= accepted < 25, output[-2000:]
    code, output = _storescu(server, files[accepted:accepted + 1])
    assert code != 0 and "Refused: OutOfResources" in output, output[-2000:]
    # What was accepted is stored; the disk never filled; Orthanc is still up.
    assert _instance_count(server) == accepted
    stats = os.statvfs(small_fs)
    # Under the watermark by about the instance that crossed it plus the index's growth (counted
    # at the next sample only), far from full.
    assert stats.f_bavail * stats.f_frsize > 5 * MB
    assert server.proc.poll() is None and server.get("/system")["Name"]
    status = server.status()["disk"]
    assert status["refusing"] and status["refused"] == 2
    assert status["estimatedFreeBytes"] < 10 * MB and "under the watermark MinFreeSpaceMB=10" in status["reason"]
    assert "disk guard" in server.log_tail(200) and "refusing C-STOREs" in server.log_tail(200)
    # A REST upload is refused as well (Orthanc answers 403 to a filtered request).
    upload = server.session.post(server.url + "/instances", data=files[-1].read_bytes(), timeout=30)
    assert upload.status_code == 403
    assert _instance_count(server) == accepted

    # Freeing space (deleting the study) lets storing resume within about a sample.
    for study in server.get("/studies"):
        server.session.delete(f"{server.url}/studies/{study}", timeout=30).raise_for_status()
    wait_for(lambda: not server.status()["disk"]["refusing"], timeout=15, what="the guard to accept again")
    assert "accepting instances again" in server.log_tail(200)
    code, output = _storescu(server, files[accepted:])
    assert code == 0, output[-2000:]
    assert _instance_count(server) == 30 - accepted


def test_watermark_zero_turns_the_guard_off(tmp_path, small_fs, servers):
    server = OrthancServer(tmp_path / "orthanc", plugin_options={"MinFreeSpaceMB": 0}, extra=_on(small_fs))
    servers.append(server.start())
    assert server.status()["disk"] == {"enabled": False, "minFreeBytes": 0}
    server.store(write_series(tmp_path / "dcm", 2, patient_id="DISK002"))
    assert _instance_count(server) == 2


def _studies(server: OrthancServer) -> set[str]:
    return set(server.get("/studies"))


def test_retention_deletes_old_studies_keeps_recent_and_undelivered_ones(tmp_path, small_fs, servers, sink):
    max_age = 5.0  # seconds, as a fraction of a day
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url, extra=_on(small_fs),
                           plugin_options={"RetentionDays": max_age / 86400, "RetentionInterval": 0.3,
                                           "RetentionWaitForJobs": False,  # age alone here: the sink has no jobs
                                           "MinFreeSpaceMB": 1, **FAST_RETRY})
    servers.append(server.start())
    assert server.status()["retention"]["enabled"]

    # An old study whose events were delivered goes.
    server.store(write_series(tmp_path / "a", 3, patient_id="OLD001"))
    [old] = _studies(server)
    sink.wait_for_events(3, level="instance")
    wait_for(lambda: old not in _studies(server), timeout=30, what="the old study to be deleted")
    assert server.status()["retention"]["deleted"] >= 1

    # A recent one stays through further passes.
    server.store(write_series(tmp_path / "b", 3, patient_id="NEW001"))
    stored = time.monotonic()
    [recent] = _studies(server)
    passes = server.status()["retention"]["passes"]
    wait_for(lambda: server.status()["retention"]["passes"] >= passes + 2, timeout=10, what="two more passes")
    assert recent in _studies(server)
    assert time.monotonic() - stored < max_age - 1, "too slow to tell recent from old"

    # An old study whose events wait in the spool (the scheduler is down) stays until they are delivered.
    sink.stop()
    server.store(write_series(tmp_path / "c", 3, patient_id="SPOOL01"))
    [spooled] = _studies(server) - {recent}
    wait_for(lambda: server.status()["spoolLength"] >= 3, timeout=20, what="the events in the spool")
    kept = server.status()["retention"]["keptUndelivered"]
    wait_for(lambda: recent not in _studies(server), timeout=30, what="the study stored second to age out")
    wait_for(lambda: server.status()["retention"]["keptUndelivered"] > kept, timeout=30,
             what="retention to keep the spooled study")
    assert spooled in _studies(server)
    sink.start()
    wait_for(lambda: server.status()["spoolLength"] == 0, timeout=30, what="the spool delivered")
    wait_for(lambda: spooled not in _studies(server), timeout=30, what="the delivered study to be deleted")
    assert server.proc.poll() is None
    with pytest.raises(requests.HTTPError):
        server.get(f"/studies/{spooled}")
