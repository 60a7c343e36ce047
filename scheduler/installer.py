"""Installing, removing and backing up services (what `service.sh` runs).

A service to install is a folder with `registry/` (settings.json + callback package) and
`module/` (the worker package, optional requirements.txt). It is validated together with
the installed services before anything is touched; a broken one is refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import click
import requests

from dicomflow.config import load_config
from dicomflow.errors import DicomflowError, ServiceNameError
from dicomflow.service import check_service_name
from dicomflow.settings import Settings
from scheduler.registry import Problem, load_registry


class InstallError(DicomflowError):
    """A service cannot be installed, removed or backed up; the message says why."""


def validate(name: str, source: Path, settings: Settings, extra_path: list[str] | None = None) -> list[Problem]:
    """Problems of service `name` from `source` when added to the installed ones.

    Loads the installed services plus the candidate (as `name`) in a scratch folder, and
    imports the candidate's worker functions in a fresh interpreter. `extra_path`: folders
    where the candidate's requirements were installed for this check (not yet in the venv).
    """
    check_service_name(name)
    spec = importlib.util.find_spec(name)
    modules_dir = (settings.services_dir / "modules").resolve()
    if spec is not None and spec.has_location and spec.origin and not spec.origin.startswith(str(modules_dir)):
        raise ServiceNameError(f"service name {name!r} is taken by an installed package ({spec.origin}): "
                               "the workers would import that instead")
    registry_src, module_src = source / "registry", source / "module"
    for folder in (registry_src, module_src):
        if not folder.is_dir():
            raise InstallError(f"{folder} does not exist: a service folder holds registry/ and module/")
    installed = settings.services_dir / "registry"
    with tempfile.TemporaryDirectory(prefix="dicomflow-check-") as scratch:
        scratch_dir = Path(scratch)
        if installed.is_dir():
            for other in installed.iterdir():
                if other.is_dir() and other.name != name and not other.name.startswith("."):
                    os.symlink(other.resolve(), scratch_dir / other.name)
        shutil.copytree(registry_src, scratch_dir / name)
        sys.path[:0] = extra_path or []
        try:
            registry, importer = load_registry(scratch_dir, settings.queues, settings.config)
        finally:
            del sys.path[:len(extra_path or [])]
        importer.retire()
        problems = [p for p in registry.problems if p.service == name or p.severity == "error"]
        before, before_importer = load_registry(installed, settings.queues, settings.config)
        before_importer.retire()
        known = {(p.service, p.message) for p in before.problems}
        problems = [p for p in problems if p.service == name or (p.service, p.message) not in known]
        if any(p.severity == "error" and p.service == name for p in problems):
            return problems
        modules_dir = scratch_dir / "_modules"
        modules_dir.mkdir()
        shutil.copytree(module_src, modules_dir / name)
        for dotted in _worker_paths(scratch_dir / name):
            problem = _check_worker(dotted, [str(modules_dir), *(extra_path or []),
                                             str(settings.services_dir / "modules")])
            if problem:
                problems.append(Problem(name, str(module_src), problem, "worker"))
    return problems


def _worker_paths(registry_dir: Path) -> list[str]:
    """The `worker` of every job in a (valid) settings.json, enabled or not."""
    data = json.loads((registry_dir / "settings.json").read_text())
    entries = data if isinstance(data, list) else [data]
    return sorted({e["worker"] for e in entries if isinstance(e, dict) and isinstance(e.get("worker"), str)})


def _check_worker(dotted: str, path: list[str]) -> str | None:
    """Import `package.function` in a fresh interpreter; a message when that fails."""
    module, _, attr = dotted.rpartition(".")
    code = ("import importlib, sys; sys.path[:0] = sys.argv[3:]; "
            "m = importlib.import_module(sys.argv[1]); f = getattr(m, sys.argv[2], None); "
            "sys.exit(0 if callable(f) else 'no function ' + sys.argv[2] + ' in ' + sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, module, attr, *path],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"worker {dotted!r} is not importable: {last}"
    return None


def _install_requirements(module_src: Path, target: str | None = None) -> bool:
    """pip-install the service's requirements.txt (into `target` instead of the venv when given).

    Returns whether there was anything to install.
    """
    requirements = module_src / "requirements.txt"
    if not requirements.is_file():
        return False
    lines = [ln for ln in requirements.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return False
    where = ["--target", target] if target else []
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *where, "-r", str(requirements)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise InstallError(f"installing {requirements} failed:\n{proc.stderr.strip()[-2000:]}")
    return True


def _replace_tree(source: Path, target: Path) -> None:
    """Copy `source` to `target`, replacing it in one rename (no half-installed service)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.new-{uuid.uuid4().hex[:6]}"
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:6]}"
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("__pycache__"))
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def install(name: str, source: Path, settings: Settings) -> list[Problem]:
    """Validate then install; returns warnings. Raises InstallError with every problem."""
    source = source.resolve()
    # The requirements go to a scratch folder for the check, and into the workers' venv only
    # once the service is accepted: a refused service changes nothing.
    with tempfile.TemporaryDirectory(prefix="dicomflow-req-") as scratch:
        needed = (source / "module").is_dir() and _install_requirements(source / "module", target=scratch)
        problems = validate(name, source, settings, extra_path=[scratch] if needed else None)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise InstallError(f"service {name!r} refused, nothing changed:\n" + "\n".join(f"  {p}" for p in errors))
    if needed:
        _install_requirements(source / "module")
    _replace_tree(source / "module", settings.services_dir / "modules" / name)
    _replace_tree(source / "registry", settings.services_dir / "registry" / name)
    return [p for p in problems if p.severity != "error"]


#: The file `backup` writes into a backup folder, naming the service it holds.
BACKUP_MARKER = ".dicomflow-backup"
#: What a backup folder holds (and nothing else).
_BACKUP_ENTRIES = {"registry", "module", BACKUP_MARKER}


def _backup_of(folder: Path) -> str | None:
    """The service a backup folder holds: its marker's, or (backups made before the marker)
    the package of its settings.json's `worker`; None when it tells neither."""
    try:
        return str(json.loads((folder / BACKUP_MARKER).read_text())["service"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        entries = _job_entries(folder / "registry")
    except (OSError, ValueError):
        return None
    packages = {e["worker"].split(".", 1)[0] for e in entries if isinstance(e.get("worker"), str)}
    return packages.pop() if len(packages) == 1 else None


def backup(name: str, target: Path, settings: Settings) -> Path:
    """Copy an installed service to `target` as registry/ + module/ (installable again).

    A `target` that already holds a backup of the same service is replaced (the new copy is
    written beside it and renamed into place, so a failure leaves the old one whole); a
    `target` holding anything else is refused.
    """
    check_service_name(name)
    registry = settings.services_dir / "registry" / name
    module = settings.services_dir / "modules" / name
    if not registry.is_dir() and not module.is_dir():
        raise InstallError(f"service {name!r} is not installed")
    target = Path(os.path.abspath(target))
    replace = target.is_dir() and any(target.iterdir())
    if target.exists() and not target.is_dir():
        raise InstallError(f"backup folder {target} is a file")
    if replace:
        held = {entry.name for entry in target.iterdir()}
        if not held <= _BACKUP_ENTRIES:
            others = ", ".join(sorted(held - _BACKUP_ENTRIES))
            raise InstallError(f"backup folder {target} holds other files ({others}): choose an empty or new folder")
        owner = _backup_of(target)
        if owner != name:
            raise InstallError(f"backup folder {target} holds a backup of "
                               f"{'service ' + repr(owner) if owner else 'an unknown service'}, not of {name!r}: "
                               "choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.new-{uuid.uuid4().hex[:6]}"
    try:
        staging.mkdir()
        ignore = shutil.ignore_patterns("__pycache__")
        if registry.is_dir():
            shutil.copytree(registry, staging / "registry", ignore=ignore)
        if module.is_dir():
            shutil.copytree(module, staging / "module", ignore=ignore)
        (staging / BACKUP_MARKER).write_text(json.dumps({
            "service": name, "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "from": str(settings.services_dir)}) + "\n")
        if replace:
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:6]}"
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if target.is_dir():
                target.rmdir()  # empty
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _job_entries(registry_dir: Path) -> list[dict]:
    """The job objects of a service's settings.json, as JSON (no validation)."""
    data = json.loads((registry_dir / "settings.json").read_text())
    entries = data if isinstance(data, list) else [data]
    return [e for e in entries if isinstance(e, dict)]


def dependents(name: str, settings: Settings) -> list[str]:
    """Installed services with jobs that `dependsOn` a job of service `name`, as
    `"service (job depends on job)"`; read from the settings.json files as they are."""
    installed = settings.services_dir / "registry"
    try:
        mine = {e["jobName"] for e in _job_entries(installed / name) if isinstance(e.get("jobName"), str)}
    except (OSError, ValueError):
        return []
    found = []
    for other in sorted(installed.iterdir()) if installed.is_dir() else []:
        if other.name == name or other.name.startswith(".") or not other.is_dir():
            continue
        try:
            entries = _job_entries(other)
        except (OSError, ValueError):
            continue
        for entry in entries:
            needs = entry.get("dependsOn") or []
            needs = [needs] if isinstance(needs, str) else needs if isinstance(needs, list) else []
            hit = sorted(mine.intersection(n for n in needs if isinstance(n, str)))
            if hit:
                found.append(f"{other.name} ({entry.get('jobName')} depends on {', '.join(hit)})")
    return found


def remove(name: str, settings: Settings, backup_to: Path | None = None, force: bool = False) -> list[str]:
    """Remove an installed service, after backing it up when asked.

    Refused while other installed services depend on its jobs, unless `force`; returns those
    dependents (what a forced removal leaves with an unknown dependency).
    """
    check_service_name(name)
    registry = settings.services_dir / "registry" / name
    module = settings.services_dir / "modules" / name
    if not registry.is_dir() and not module.is_dir():
        raise InstallError(f"service {name!r} is not installed")
    needed_by = dependents(name, settings)
    if needed_by and not force:
        raise InstallError(f"service {name!r} not removed: other services depend on it: "
                           f"{'; '.join(needed_by)}. Remove them first, or pass --force "
                           "(they are then excluded as load problems until it is back)")
    if backup_to is not None:
        backup(name, backup_to, settings)
    for folder in (registry, module):
        if folder.is_dir():
            shutil.rmtree(folder)
    return needed_by


def notify_scheduler(settings: Settings) -> str:
    """Ask a running scheduler to reload now (it also notices by itself within seconds)."""
    url = f"http://{settings.scheduler_host}:{settings.scheduler_port}/api/v1/services/reload"
    try:
        response = requests.post(url, headers={"Authorization": f"Bearer {settings.scheduler_token}"}, timeout=5)
    except requests.RequestException:
        return "scheduler not running; it loads the services when it starts"
    return "scheduler reloaded" if response.ok else f"scheduler answered {response.status_code}"


def _settings(config_path: str | None) -> Settings:
    config: Mapping[str, str] = load_config(config_path)
    return Settings.from_config(config)


EXIT_CODES = ("Exit status: 0 done; 1 refused or failed (the message says why; nothing was changed); "
              "2 a usage error.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.option("--config", "config_path", envvar="DICOMFLOW_CONFIG", help="the .env-style configuration file")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Install, remove and back up dicomflow services (bash service.sh COMMAND --help)."""
    ctx.obj = config_path


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@main.command("install", epilog="Exit status: 0 installed; 1 refused, with every problem listed "
              "(nothing was changed); 2 a usage error.")
@click.argument("name")
@click.option("-p", "--path", "path", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder with registry/ and module/")
@click.pass_obj
def install_cmd(config_path: str | None, name: str, path: Path) -> None:
    """Validate and install service NAME from PATH (which holds registry/ and module/).

    The service is checked together with the installed ones (callbacks and worker functions
    imported, requirements installed into a scratch folder for the check) before anything is
    touched; the running scheduler picks it up without a restart.
    """
    try:
        settings = _settings(config_path)
        warnings = install(name, path, settings)
    except (DicomflowError, ServiceNameError) as exc:
        _fail(exc)
    for w in warnings:
        click.echo(str(w), err=True)
    click.echo(f"installed {name}: {notify_scheduler(settings)}")
    click.echo("workers load a new or changed worker package when they start: restart them "
               "(bash run.sh restart workers) if this service was installed before")


@main.command("check", epilog="Exit status: 0 valid; 1 not valid (every problem listed) or PATH unusable; "
              "2 a usage error.")
@click.argument("name")
@click.option("-p", "--path", "path", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.pass_obj
def check_cmd(config_path: str | None, name: str, path: Path) -> None:
    """Validate service NAME from PATH without installing it."""
    try:
        problems = validate(name, path.resolve(), _settings(config_path))
    except DicomflowError as exc:
        _fail(exc)
    for p in problems:
        click.echo(str(p), err=True)
    if any(p.severity == "error" for p in problems):
        sys.exit(1)
    click.echo(f"{name}: ok")


@main.command("remove", epilog="Exit status: 0 removed; 1 refused (not installed, other services depend on "
              "it, or the backup failed: nothing was removed); 2 a usage error.")
@click.argument("name")
@click.option("-b", "--backup", "backup_to", type=click.Path(path_type=Path),
              help="back it up here first (as the backup command does)")
@click.option("--force", is_flag=True, help="remove it even though other services depend on it")
@click.pass_obj
def remove_cmd(config_path: str | None, name: str, backup_to: Path | None, force: bool) -> None:
    """Remove service NAME (after a backup with -b).

    Refused while jobs of other installed services depend on its jobs (dependsOn; they are
    named), unless --force: they are then excluded as load problems until NAME is back.
    """
    try:
        settings = _settings(config_path)
        left = remove(name, settings, backup_to, force=force)
    except DicomflowError as exc:
        _fail(exc)
    for dependent in left:
        click.echo(f"warning: removed although {dependent}: it is excluded until {name} is back", err=True)
    click.echo(f"removed {name}" + (f" (backup in {backup_to})" if backup_to else "")
               + f": {notify_scheduler(settings)}")


@main.command("backup", epilog="Exit status: 0 backed up; 1 refused (not installed, or BACKUP holds something "
              "else than a backup of NAME) or failed; 2 a usage error.")
@click.argument("name")
@click.option("-b", "--backup", "backup_to", required=True, type=click.Path(path_type=Path),
              help="the backup folder")
@click.pass_obj
def backup_cmd(config_path: str | None, name: str, backup_to: Path) -> None:
    """Copy service NAME to BACKUP (registry/ + module/, installable again with install -p).

    A BACKUP that already holds a backup of NAME is replaced (the new copy is swapped in with
    a rename); one that holds anything else is refused.
    """
    try:
        backup(name, backup_to, _settings(config_path))
    except DicomflowError as exc:
        _fail(exc)
    click.echo(f"backed up {name} to {backup_to}")


if __name__ == "__main__":
    main(prog_name="bash service.sh")
