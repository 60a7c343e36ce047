"""run.sh and docker-compose.yml as an operator uses them."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import requests

from dicomflow.config import load_config, parse_env_file
from dicomflow.errors import ConfigError
from dicomflow.settings import Settings
from tests.conftest import REPO
from tests.support.orthanc import NODELAY_ENV, STORESCU, write_series
from tests.support.procs import free_port, process_running, wait_for


def _pids_under(home: Path) -> list[str]:
    """Processes whose command line mentions the state folder (what run.sh started)."""
    out = subprocess.run(["pgrep", "-af", str(home)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def _niceness(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[16])


def _workers(status: str) -> list[int]:
    """The numbers of the RUNNING worker programs in `run.sh status`."""
    return sorted(int(n) for n in re.findall(r"^worker-(\d+)\s+RUNNING", status, re.M))


def _running_pids(status: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"^(\S+)\s+RUNNING\s+pid (\d+)", status, re.M)}


def test_run_sh_starts_everything_and_stop_leaves_nothing(tmp_path):
    home = tmp_path / "state"
    env = {**os.environ, "DICOMFLOW_HOME": str(home), "DICOMFLOW_NATIVE": "1",
           "DICOMFLOW_REDIS_PORT": str(free_port()), "DICOMFLOW_SCHEDULER_PORT": str(free_port()),
           "DICOMFLOW_DASHBOARD_PORT": str(free_port()), "ORTHANC_HTTP_PORT": str(free_port()),
           "ORTHANC_DICOM_PORT": str(free_port())}
    env.pop("DICOMFLOW_CONFIG", None)
    run = lambda *a: subprocess.run(["bash", str(REPO / "run.sh"), *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=180)
    try:
        started = run("--workers", "3")
        assert started.returncode == 0, started.stdout + started.stderr
        assert "Orthanc Explorer" in started.stdout and "RQ dashboard" in started.stdout
        conf = home / "dicomflow.env"
        assert oct(conf.stat().st_mode & 0o777) == "0o600"
        values = parse_env_file(conf.read_text())
        for secret in ("DICOMFLOW_SCHEDULER_TOKEN", "DICOMFLOW_DASHBOARD_PASSWORD", "ORTHANC_PASSWORD",
                       "DICOMFLOW_REDIS_PASSWORD"):
            assert len(values[secret]) >= 24, secret
        status = run("status")
        assert status.returncode == 0
        assert _workers(status.stdout) == [0, 1, 2], status.stdout
        for program in ("redis", "orthanc", "scheduler", "dashboard"):
            assert re.search(rf"^{program}\s+RUNNING", status.stdout, re.M), status.stdout
        pids = {name: int(pid) for name, pid in re.findall(r"^(\S+)\s+RUNNING\s+pid (\d+)", status.stdout, re.M)}
        # What processes yields the CPU to Orthanc's ingest (DICOMFLOW_NICE, 10 by default).
        assert _niceness(pids["orthanc"]) == 0
        for program in ("redis", "scheduler", "dashboard", "worker-0"):
            assert _niceness(pids[program]) == 10, program
        sched = f"http://127.0.0.1:{values['DICOMFLOW_SCHEDULER_PORT']}"
        assert requests.get(sched + "/api/v1/services", timeout=5).status_code == 401
        assert requests.get(sched + "/api/v1/services", timeout=5,
                            headers={"Authorization": f"Bearer {values['DICOMFLOW_SCHEDULER_TOKEN']}"}).ok
        dash = f"http://127.0.0.1:{values['DICOMFLOW_DASHBOARD_PORT']}/"
        assert requests.get(dash, timeout=5).status_code == 401
        assert requests.get(dash, timeout=5, auth=("admin", values["DICOMFLOW_DASHBOARD_PASSWORD"])).ok
        orthanc = f"http://127.0.0.1:{values['ORTHANC_HTTP_PORT']}"
        assert requests.get(orthanc + "/system", timeout=5).status_code == 401
        plugin_status = lambda: requests.get(orthanc + "/dicomflow/status", timeout=5,  # noqa: E731
                                             auth=(values["ORTHANC_USERNAME"], values["ORTHANC_PASSWORD"])).json()
        assert plugin_status()["sender"] == "running"
        # One instance, so that the plugin's builder process runs too (it must stop with the rest).
        instance = write_series(tmp_path / "dcm", 1, patient_id="RUNSH01")[0]
        sent = subprocess.run([STORESCU, "-aec", values.get("ORTHANC_AET", "DICOMFLOW"), "127.0.0.1",
                               values["ORTHANC_DICOM_PORT"], str(instance)], env={**env, **NODELAY_ENV},
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        builder = wait_for(lambda: plugin_status()["builderPid"], timeout=30, what="the builder process")
        # The plugin's BuilderNice (10): the child yields the CPU to Orthanc, once it has read its configuration.
        wait_for(lambda: _niceness(builder) == 10, timeout=10, what="the builder process at nice 10")
        assert _pids_under(home), "run.sh should have started processes"
        assert "already running" in run().stdout
        # A second start keeps the same secrets.
        assert parse_env_file(conf.read_text()) == values

        # Scaling the running stack: only the new workers start, only the highest-numbered stop.
        scaled = run("--workers", "4")
        assert scaled.returncode == 0 and "scaled from 3 to 4" in scaled.stdout, scaled.stdout + scaled.stderr
        after = _running_pids(run("status").stdout)
        assert _workers(run("status").stdout) == [0, 1, 2, 3]
        assert all(after[f"worker-{i}"] == pids[f"worker-{i}"] for i in range(3)), (pids, after)
        scaled = run("--workers", "2")
        assert scaled.returncode == 0 and "scaled from 4 to 2" in scaled.stdout, scaled.stdout + scaled.stderr
        status = run("status").stdout
        assert _workers(status) == [0, 1]
        assert _running_pids(status)["worker-0"] == pids["worker-0"]
        assert _running_pids(status)["orthanc"] == pids["orthanc"], "scaling must not touch Orthanc"

        # A configuration change is reported, and applied by restart (which keeps the worker count).
        token = {"Authorization": f"Bearer {values['DICOMFLOW_SCHEDULER_TOKEN']}"}
        inactive = requests.get(sched + "/api/v1/services", timeout=5, headers=token).json()["inactive"]
        assert "repack" in inactive
        with conf.open("a") as file:
            file.write(f"REPACK_DATADIR={tmp_path / 'pypx'}\n")
        assert "changed since the stack started" in run("status").stdout
        restarted = run("restart")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        status = run("status").stdout
        assert _workers(status) == [0, 1] and "changed since" not in status
        assert _running_pids(status)["orthanc"] != pids["orthanc"]
        jobs = requests.get(sched + "/api/v1/services", timeout=5, headers=token).json()["jobs"]
        assert "repack" in {job["jobName"] for job in jobs}
        before = _running_pids(status)
        again = run("restart", "workers")
        assert again.returncode == 0 and "restarted 2 worker(s)" in again.stdout, again.stdout + again.stderr
        status = run("status").stdout
        assert _running_pids(status)["scheduler"] == before["scheduler"]
        assert _running_pids(status)["worker-0"] != before["worker-0"]
        shell = run("env")
        assert shell.returncode == 0
        assert f"ORTHANC_DICOM_PORT={values['ORTHANC_DICOM_PORT']}" in shell.stdout.splitlines()
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not _pids_under(home), timeout=30, what="every process run.sh started to exit")
    wait_for(lambda: not process_running(builder), timeout=10, what="the plugin's builder process to exit")
    assert run("status").returncode == 3


def test_run_sh_usage_errors(tmp_path):
    env = {**os.environ, "DICOMFLOW_HOME": str(tmp_path), "DICOMFLOW_NATIVE": "1"}
    for args in (["--workers", "zero"], ["--workers"], ["bogus"], ["status", "--workers", "2"],
                 ["restart", "workers", "--workers", "2"], ["stop", "status"], ["workers"]):
        done = subprocess.run(["bash", str(REPO / "run.sh"), *args], env=env, capture_output=True, text=True)
        assert done.returncode == 2, (args, done.stderr)
        assert "usage: bash run.sh" in done.stderr
    assert not (tmp_path / "dicomflow.env").exists()


def test_run_sh_without_a_stack(tmp_path):
    """restart workers and status answer 3 when nothing runs; env needs a configuration."""
    env = {**os.environ, "DICOMFLOW_HOME": str(tmp_path), "DICOMFLOW_NATIVE": "1"}
    env.pop("DICOMFLOW_CONFIG", None)
    run = lambda *a: subprocess.run(["bash", str(REPO / "run.sh"), *a], env=env, capture_output=True,  # noqa: E731
                                    text=True, timeout=60)
    assert run("status").returncode == 3
    assert run("restart", "workers").returncode == 3
    done = run("env")
    assert done.returncode == 1 and "no configuration yet" in done.stderr
    assert run("stop").returncode == 0


def test_config_file_and_environment(tmp_path):
    path = tmp_path / "c.env"
    path.write_text("# comment\nDICOMFLOW_QUEUES=a,b\nexport ORTHANC_URL='http://x:1'\nOTHER=1 # trailing\n")
    config = load_config(path, environ={"DICOMFLOW_QUEUES": "z", "CHRIS_URL": "http://c/", "HOME": "/root",
                                        "REDIS_STORE_URL": "redis://s/1"})
    assert config == {"DICOMFLOW_QUEUES": "z", "ORTHANC_URL": "http://x:1", "OTHER": "1", "CHRIS_URL": "http://c/",
                      "REDIS_STORE_URL": "redis://s/1"}
    assert Settings.from_config(config).queues == ("z",)
    path.write_text("not an assignment\n")
    with pytest.raises(ConfigError, match=r"c.env:1: expected KEY=VALUE"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="DICOMFLOW_SCHEDULER_PORT"):
        Settings.from_config({"DICOMFLOW_SCHEDULER_PORT": "eighty"})
