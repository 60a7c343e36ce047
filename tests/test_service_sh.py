"""service.sh install / remove / backup, run as a user would (bash, real files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.support.procs import free_port

EXAMPLES = REPO / "examples"


@pytest.fixture()
def sh(services, redis_url):
    env = {**os.environ, "DICOMFLOW_SERVICES_DIR": str(services), "DICOMFLOW_PYTHON": sys.executable,
           "DICOMFLOW_REDIS_URL": redis_url, "DICOMFLOW_SCHEDULER_PORT": str(free_port()),
           "DICOMFLOW_SCHEDULER_TOKEN": "t", "DICOMFLOW_CONFIG": ""}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(REPO / "service.sh"), *args], env=env, capture_output=True, text=True,
                              timeout=120)
    run.env = env
    return run


def test_relative_paths_are_the_callers(sh, services, tmp_path, monkeypatch):
    shutil.copytree(EXAMPLES / "temp", tmp_path / "here" / "temp")
    env_cwd = tmp_path / "here"
    done = subprocess.run(["bash", str(REPO / "service.sh"), "install", "temp", "-p", "temp"], cwd=env_cwd,
                          env=sh.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run(["bash", str(REPO / "service.sh"), "backup", "temp", "-b", "bk"], cwd=env_cwd,
                          env=sh.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and (env_cwd / "bk" / "registry" / "settings.json").is_file()


def test_install_backup_remove_round_trip(sh, services, tmp_path):
    done = sh("install", "temp", "-p", str(EXAMPLES / "temp"))
    assert done.returncode == 0, done.stderr
    assert "installed temp" in done.stdout
    assert (services / "registry/temp/settings.json").is_file() and (services / "modules/temp/__init__.py").is_file()
    assert sh("install", "tempfollow", "-p", str(EXAMPLES / "tempfollow")).returncode == 0

    backup = tmp_path / "backup-temp"
    assert sh("backup", "temp", "-b", str(backup)).returncode == 0
    assert json.loads((backup / "registry/settings.json").read_text())["jobName"] == "tempJob"
    assert (backup / "module/__init__.py").read_text() == (EXAMPLES / "temp/module/__init__.py").read_text()

    removed = sh("remove", "tempfollow", "-b", str(tmp_path / "backup-follow"))
    assert removed.returncode == 0, removed.stderr
    assert not (services / "registry/tempfollow").exists() and not (services / "modules/tempfollow").exists()
    assert (tmp_path / "backup-follow/registry/settings.json").is_file()

    # A backup installs again as it was.
    assert sh("install", "tempfollow", "-p", str(tmp_path / "backup-follow")).returncode == 0
    assert (services / "registry/tempfollow/__init__.py").is_file()


def test_broken_service_is_refused_and_installed_one_untouched(sh, services, tmp_path):
    assert sh("install", "temp", "-p", str(EXAMPLES / "temp")).returncode == 0
    before = (services / "registry/temp/settings.json").read_text()
    broken = tmp_path / "broken"
    shutil.copytree(EXAMPLES / "temp", broken)
    (broken / "registry/settings.json").write_text('{"jobName": "tempJob", "worker": "temp.worker", "timeout": "x"}')
    refused = sh("install", "temp", "-p", str(broken))
    assert refused.returncode == 1
    assert "refused, nothing changed" in refused.stderr and "[timeout]" in refused.stderr
    assert (services / "registry/temp/settings.json").read_text() == before


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: (d / "registry/__init__.py").write_text("import nonexistent_lib\n"),
     "ModuleNotFoundError: No module named 'nonexistent_lib'"),
    (lambda d: (d / "module/__init__.py").write_text("def other(**kw): pass\n"),
     "worker 'brk.worker' is not importable: no function worker in brk"),
    (lambda d: (d / "registry/settings.json").write_text(json.dumps(
        {"jobName": "brkJob", "worker": "brk.worker", "callback": "brk.callback", "dependsOn": "ghost"})),
     "depends on 'ghost', which is not a known job"),
    (lambda d: shutil.rmtree(d / "module"), "module does not exist"),
])
def test_refusals_say_why(sh, services, tmp_path, mutate, expected):
    source = tmp_path / "brk"
    shutil.copytree(EXAMPLES / "temp", source)
    (source / "registry/settings.json").write_text(json.dumps(
        {"jobName": "brkJob", "worker": "brk.worker", "callback": "brk.callback"}))
    mutate(source)
    refused = sh("install", "brk", "-p", str(source))
    assert refused.returncode == 1 and expected in refused.stderr, refused.stderr
    assert not (services / "registry/brk").exists() and not (services / "modules/brk").exists()


@pytest.mark.parametrize("name", ["../evil", "a/b", "1abc", "with-dash", "class", "worker", "", "json", "logging",
                                  "numpy", "click"])
def test_bad_names_are_refused(sh, services, name):
    refused = sh("install", name, "-p", str(EXAMPLES / "temp"))
    assert refused.returncode != 0
    assert "error:" in refused.stderr or "Usage" in refused.stderr
    if name in ("json", "logging"):
        assert "reserved" in refused.stderr
    if name in ("numpy", "click"):
        assert "taken by an installed package" in refused.stderr
    assert not services.exists() or not any(services.rglob("settings.json"))


def test_usage_errors(sh):
    for args in ([], ["frobnicate", "x"], ["install"], ["install", "temp"], ["backup", "temp"]):
        done = sh(*args)
        assert done.returncode != 0, args
        assert "service.sh install NAME -p PATH" in done.stderr or "Usage" in done.stderr or "Missing" in done.stderr


def test_remove_unknown_service(sh):
    done = sh("remove", "ghost")
    assert done.returncode == 1 and "not installed" in done.stderr


def test_requirements_are_installed_at_install_time(sh, services, tmp_path):
    source = tmp_path / "withreq"
    shutil.copytree(EXAMPLES / "temp", source)
    (source / "registry/settings.json").write_text(json.dumps(
        {"jobName": "reqJob", "worker": "withreq.worker", "callback": "withreq.callback"}))
    # A local package (no network needed) stands for a real requirement.
    pkg = tmp_path / "dicomflow_reqdemo"
    (pkg / "dicomflow_reqdemo").mkdir(parents=True)
    (pkg / "dicomflow_reqdemo/__init__.py").write_text("VALUE = 42\n")
    (pkg / "pyproject.toml").write_text(
        '[project]\nname = "dicomflow-reqdemo"\nversion = "1.0"\n'
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n')
    (source / "module/requirements.txt").write_text(f"{pkg}\n")
    (source / "module/__init__.py").write_text("import dicomflow_reqdemo\n\ndef worker(**kw):\n"
                                              "    return dicomflow_reqdemo.VALUE\n")
    try:
        # Refused (its callback is broken): the requirement must not reach the venv.
        good_registry = (source / "registry/__init__.py").read_text()
        (source / "registry/__init__.py").write_text("raise RuntimeError('broken callback')\n")
        refused = sh("install", "withreq", "-p", str(source))
        assert refused.returncode == 1, refused.stderr
        absent = subprocess.run([sys.executable, "-c", "import dicomflow_reqdemo"], capture_output=True)
        assert absent.returncode != 0, "a refused service installed its requirements"
        (source / "registry/__init__.py").write_text(good_registry)
        done = sh("install", "withreq", "-p", str(source))
        assert done.returncode == 0, done.stderr
        check = subprocess.run([sys.executable, "-c", "import dicomflow_reqdemo; print(dicomflow_reqdemo.VALUE)"],
                               capture_output=True, text=True)
        assert check.stdout.strip() == "42"
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "dicomflow-reqdemo"],
                       capture_output=True)


def test_backup_then_remove_into_the_same_folder(sh, services, tmp_path):
    """The README's sequence: a backup, then remove -b into the same folder (issue 21, item 1)."""
    assert sh("install", "temp", "-p", str(EXAMPLES / "temp")).returncode == 0
    backup = tmp_path / "backups" / "temp"
    assert sh("backup", "temp", "-b", str(backup)).returncode == 0
    first = json.loads((backup / ".dicomflow-backup").read_text())
    assert first["service"] == "temp"
    (services / "registry/temp/settings.json").write_text(
        (services / "registry/temp/settings.json").read_text().replace("Template service", "Changed service"))
    removed = sh("remove", "temp", "-b", str(backup))
    assert removed.returncode == 0, removed.stderr
    assert not (services / "registry/temp").exists()
    # The backup holds the copy made at the removal, and nothing was left beside it.
    assert "Changed service" in (backup / "registry/settings.json").read_text()
    assert sorted(p.name for p in backup.parent.iterdir()) == ["temp"]
    assert sh("install", "temp", "-p", str(backup)).returncode == 0
    # A backup made before the marker existed is recognised by its worker's package.
    (backup / ".dicomflow-backup").unlink()
    assert sh("backup", "temp", "-b", str(backup)).returncode == 0


def test_a_backup_folder_of_something_else_is_refused(sh, services, tmp_path):
    assert sh("install", "temp", "-p", str(EXAMPLES / "temp")).returncode == 0
    assert sh("install", "tempfollow", "-p", str(EXAMPLES / "tempfollow")).returncode == 0
    backup = tmp_path / "bk"
    assert sh("backup", "temp", "-b", str(backup)).returncode == 0
    before = (backup / ".dicomflow-backup").read_text()
    refused = sh("backup", "tempfollow", "-b", str(backup))
    assert refused.returncode == 1 and "holds a backup of service 'temp'" in refused.stderr, refused.stderr
    assert (backup / ".dicomflow-backup").read_text() == before
    refused = sh("remove", "tempfollow", "-b", str(backup))
    assert refused.returncode == 1 and (services / "registry/tempfollow").is_dir(), "nothing removed"
    other = tmp_path / "papers"
    other.mkdir()
    (other / "thesis.pdf").write_text("x")
    refused = sh("backup", "temp", "-b", str(other))
    assert refused.returncode == 1 and "holds other files (thesis.pdf)" in refused.stderr, refused.stderr
    assert sorted(p.name for p in other.iterdir()) == ["thesis.pdf"]


def test_removing_a_service_others_depend_on_is_refused_unless_forced(sh, services, tmp_path):
    """(issue 21, item 2) tempfollow dependsOn tempJob: removing temp would break it silently."""
    assert sh("install", "temp", "-p", str(EXAMPLES / "temp")).returncode == 0
    assert sh("install", "tempfollow", "-p", str(EXAMPLES / "tempfollow")).returncode == 0
    refused = sh("remove", "temp", "-b", str(tmp_path / "bk"))
    assert refused.returncode == 1
    assert "tempfollow (tempFollowJob depends on tempJob)" in refused.stderr and "--force" in refused.stderr
    assert (services / "registry/temp").is_dir() and (services / "modules/temp").is_dir()
    assert not (tmp_path / "bk").exists(), "a refused removal makes no backup either"
    forced = sh("remove", "temp", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "warning: removed although tempfollow" in forced.stderr
    assert not (services / "registry/temp").exists()
    # With its dependency gone tempfollow is a load problem; removing it needs no force.
    assert sh("remove", "tempfollow").returncode == 0
