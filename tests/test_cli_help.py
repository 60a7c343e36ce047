"""Every command of run.sh and service.sh answers --help with exit 0 and says its exit codes (issue 21, item 6)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

RUN_SH_COMMANDS = ["start", "status", "stop", "restart", "env"]
SERVICE_SH_COMMANDS = ["install", "check", "backup", "remove"]


def _run(script: str, *args: str, home=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DICOMFLOW_PYTHON": sys.executable, "DICOMFLOW_NATIVE": "1"}
    if home is not None:
        env["DICOMFLOW_HOME"] = str(home)
    return subprocess.run(["bash", str(REPO / script), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", ["run.sh", "service.sh"])
@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_top_level_help_exits_0(script, flag, tmp_path):
    done = _run(script, flag, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Exit status" in done.stdout and done.stderr == ""
    assert not (tmp_path / "dicomflow.env").exists(), "--help must not start or configure anything"


@pytest.mark.parametrize("command", RUN_SH_COMMANDS)
def test_each_run_sh_command_has_help_with_exit_codes(command, tmp_path):
    for args in ([command, "--help"], ["help", command]):
        done = _run("run.sh", *args, home=tmp_path)
        assert done.returncode == 0, (args, done.stderr)
        assert "bash run.sh" in done.stdout and "Exit status: 0" in done.stdout, done.stdout
    assert not (tmp_path / "dicomflow.env").exists()


def test_run_sh_top_level_help_lists_every_command(tmp_path):
    text = _run("run.sh", "--help", home=tmp_path).stdout
    for command in RUN_SH_COMMANDS + ["restart workers", "--workers N"]:
        assert command in text, command


@pytest.mark.parametrize("command", SERVICE_SH_COMMANDS)
def test_each_service_sh_command_has_help_with_exit_codes(command):
    done = _run("service.sh", command, "--help")
    assert done.returncode == 0, done.stderr
    assert f"bash service.sh {command}" in done.stdout and "Exit status: 0" in done.stdout, done.stdout


def test_service_sh_top_level_help_lists_every_command():
    text = _run("service.sh", "--help").stdout
    for command in SERVICE_SH_COMMANDS + ["--force"]:
        assert command in text, command


def test_usage_errors_exit_2():
    assert _run("service.sh").returncode == 2
    assert _run("service.sh", "frobnicate", "x").returncode == 2
    assert _run("service.sh", "install", "temp").returncode == 2  # no -p
    assert _run("run.sh", "frobnicate").returncode == 2


EXPORT_COMMANDS = ["list", "status", "retry", "force", "rate"]


@pytest.mark.parametrize("command", [None, *EXPORT_COMMANDS])
def test_dicomflow_export_help_exits_0_with_exit_codes(command):
    """dicomflow-export (research extracts' bookkeeping, docs/extracts.md): --help for it and each command."""
    script = REPO / ".venv" / "bin" / "dicomflow-export"
    program = [str(script)] if script.exists() else [sys.executable, "-m", "dicomflow.extracts.cli"]
    done = subprocess.run([*program, *([command] if command else []), "--help"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "DICOMFLOW_CONFIG": ""})
    assert done.returncode == 0, done.stderr
    assert "Exit status: 0" in done.stdout and done.stderr == ""
    if command is None:
        for name in EXPORT_COMMANDS:
            assert name in done.stdout
    assert subprocess.run([*program, "frobnicate"], capture_output=True, timeout=60).returncode == 2
