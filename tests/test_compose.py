"""docker-compose.yml runs the same system as the native stack (issue 21).

No Docker engine runs here: the file is read with PyYAML and its `${...}` interpolated as
Compose does (from the configuration file run.sh writes), then checked: every setting the
code reads reaches the containers through the one configuration file, the few overridden
inside containers are the listed ones, Orthanc gets the configuration the native stack
renders, images are pinned, every service has a healthcheck, the data folders are mounted.
service.sh's Docker mode is run with a `docker` command that records what it is asked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dicomflow.config import parse_env_file
from dicomflow.orthanc_config import OrthancSettings, render_orthanc_config
from tests.conftest import REPO
from tests.test_readme import NOT_SETTINGS, SETTING, _code_text

sys.path.insert(0, str(REPO / "orthanc"))
from dicomflow_settings import PluginSettings  # noqa: E402 - the plugin's settings (no `orthanc` import)

COMPOSE = REPO / "docker-compose.yml"
DICOMFLOW_SERVICES = ("scheduler", "worker", "dashboard")

#: Settings the containers do not take from the file, and why: where the other containers are,
#: and the address a container listens on (its port is published on the host's loopback).
CONTAINER_OVERRIDES = {
    "DICOMFLOW_CONFIG": "the configuration file at its host path, in the mounted state folder",
    "DICOMFLOW_REDIS_URL": "the redis container (the file names the host's Redis)",
    "ORTHANC_URL": "the orthanc container",
}
LISTENS = {"scheduler": "DICOMFLOW_SCHEDULER_HOST", "dashboard": "DICOMFLOW_DASHBOARD_HOST"}
#: Orthanc settings the native stack renders into Orthanc's configuration that Compose handles
#: its own way (docs/docker.md says so); every other one is in the orthanc service's ORTHANC_JSON.
ORTHANC_IN_DOCKER = {
    "ORTHANC_HTTP_PORT": "the host port published to the container's 8042",
    "ORTHANC_DICOM_PORT": "the host port published to the container's 4242",
    "ORTHANC_STORAGE_DIR": "the volume orthanc-data",
    "ORTHANC_PLUGIN_SPOOL": "in the volume orthanc-data",
    "ORTHANC_PYTHON_PLUGIN": "the image's own Python plugin",
    "ORTHANC_REMOTE_ACCESS": "the container accepts its network; the published port binds to loopback",
    "ORTHANC_MODALITIES": "not in Docker yet: the image's DicomModalities (docs/docker.md)",
    "ORTHANC_DB_URL": "not in Docker yet: the image's PostgreSQL plugin (docs/docker.md)",
    "DICOMFLOW_HOME": "the plugin's spool is in the volume orthanc-data",
}
#: Settings naming folders the workers write or read: mounted at their host path.
FOLDERS = ("DICOMFLOW_HOME", "DICOMFLOW_SERVICES_DIR", "DICOMFLOW_CACHE_DIR", "DICOMFLOW_PROJECTS_DIR",
           "DICOMFLOW_EXTRACTS_DIR", "DICOMFLOW_EXPORTS_DIR", "REPACK_DATADIR", "REPACK_LOGDIR", "CHRIS_FILES_ROOT")

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<rest>.*))?\}\Z", re.S)


def interpolate(text: str, env: dict[str, str]) -> str:
    """`text` with `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `${NAME:+other}`
    (nested in defaults too) and `$$` replaced as Compose does.

    Raises:
        KeyError: a `${NAME:?error}` whose NAME is unset or empty (Compose refuses to start).
    """
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            depth, j = 0, i
            while True:  # the matching brace
                if text.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                if text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            match = _VARIABLE.match(text[i:j + 1])
            assert match, f"not an interpolation Compose knows: {text[i:j + 1]!r}"
            name, op, rest = match["name"], match["op"], match["rest"]
            value = env.get(name)
            present = value is not None and (value != "" or not (op or "").startswith(":"))
            if op in (":-", "-"):
                out.append(value if present else interpolate(rest, env))
            elif op in (":?", "?"):
                if not present:
                    raise KeyError(f"{name}: {rest}")
                out.append(value)
            elif op in (":+", "+"):
                out.append(interpolate(rest, env) if present else "")
            else:
                out.append(value or "")
            i = j + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def resolved(value, env):
    if isinstance(value, str):
        return interpolate(value, env)
    if isinstance(value, list):
        return [resolved(v, env) for v in value]
    if isinstance(value, dict):
        return {k: resolved(v, env) for k, v in value.items()}
    return value


def run_sh_config(home: Path) -> dict[str, str]:
    """The configuration file run.sh writes on first start (its heredoc, with generated values)."""
    text = (REPO / "run.sh").read_text()
    heredoc = text[text.index("<<CONF\n") + len("<<CONF\n"):text.index("\nCONF\n")]
    lines = []
    for line in heredoc.splitlines():
        line = re.sub(r"\$\(secret\)|\$redis_pw", "s3cret-Token_x", line)
        line = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", line)
        line = line.replace("$home", str(home)).replace("$redis_port", "6389").replace("$orthanc_http", "8044")
        lines.append(line)
    config = parse_env_file("\n".join(lines))
    assert "$" not in "".join(config.values()), config
    return config


@pytest.fixture()
def compose():
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture()
def config(tmp_path):
    return run_sh_config(tmp_path / "state")


def test_every_container_reads_the_configuration_file_run_sh_writes(compose, config):
    """Those running dicomflow's code; Redis and Orthanc get only what they use, not every secret."""
    env_file = f"{config['DICOMFLOW_HOME']}/dicomflow.env"  # run.sh: $home/dicomflow.env
    for name in DICOMFLOW_SERVICES:
        assert resolved(compose["services"][name]["env_file"], config) == env_file, name
    for name in ("redis", "orthanc"):
        assert "env_file" not in compose["services"][name], name
    redis = resolved(compose["services"]["redis"], config)
    assert redis["environment"] == {"DICOMFLOW_REDIS_PASSWORD": config["DICOMFLOW_REDIS_PASSWORD"],
                                    "DICOMFLOW_REDIS_MAXMEMORY": "1gb"}
    # The password goes through a private file, not redis-server's arguments (`ps` shows those).
    script = redis["command"][-1]
    assert redis["command"][:2] == ["sh", "-c"] and "requirepass" not in script.partition("redis-server")[2]
    assert "noeviction" in script
    for name in DICOMFLOW_SERVICES:
        environment = resolved(compose["services"][name]["environment"], config)
        assert environment["DICOMFLOW_CONFIG"] == env_file, name
    without = {k: v for k, v in config.items() if k != "DICOMFLOW_HOME"}
    with pytest.raises(KeyError, match="DICOMFLOW_HOME"):
        resolved(compose["services"]["worker"]["env_file"], without)


def test_every_setting_the_code_reads_reaches_the_containers(compose):
    """Through env_file; a container overrides only the listed settings (each one for a reason)."""
    code = {n for n in SETTING.findall(_code_text()) if n not in NOT_SETTINGS and not n.startswith("ORTHANC__")}
    assert {"CHRIS_TOKEN", "NATS_URL", "CHRIS_RATE_LIMIT", "REPACK_DATADIR"} <= code  # the examples
    for name in DICOMFLOW_SERVICES:
        overridden = {k for k in compose["services"][name]["environment"] if SETTING.fullmatch(k)}
        expected = set(CONTAINER_OVERRIDES) | ({LISTENS[name]} if name in LISTENS else set())
        assert overridden == expected, (name, overridden ^ expected)
        if name in LISTENS:
            assert compose["services"][name]["environment"][LISTENS[name]] == "0.0.0.0"
    # Everything else the code reads comes from the file, as natively.
    assert code - set(CONTAINER_OVERRIDES)


def test_orthanc_gets_the_configuration_the_native_stack_renders(compose, config):
    config = {**config, "ORTHANC_STABLE_AGE": "7", "ORTHANC_PLUGIN_BATCH_SIZE": "250", "ORTHANC_AET": "SITE_A",
              "ORTHANC_PLUGIN_TAGS": "PatientID,StudyInstanceUID", "ORTHANC_RETENTION_WAIT_FOR_JOBS": "false",
              "ORTHANC_MIN_FREE_SPACE_MB": "0", "ORTHANC_RETENTION_DAYS": "1.5", "ORTHANC_ALWAYS_ALLOW_STORE": "false"}
    orthanc = compose["services"]["orthanc"]
    docker = json.loads(resolved(orthanc["environment"]["ORTHANC_JSON"], config))
    native = render_orthanc_config(OrthancSettings.from_config(config), scheduler_url="http://127.0.0.1:8642",
                                   token=config["DICOMFLOW_SCHEDULER_TOKEN"])
    for key in ("Name", "DicomAet", "StorageCompression", "AuthenticationEnabled", "RegisteredUsers",
                "DicomAlwaysAllowStore", "StableAge", "HttpDescribeErrors", "PythonVerbose"):
        assert docker[key] == native[key], key
    assert Path(docker["PythonScript"]).name == Path(native["PythonScript"]).name == "dicomflow_plugin.py"
    assert "LuaScripts" not in docker and "LuaScripts" not in native  # series/study completion: the scheduler's
    # StatusPageUrl: the scheduler's page as the browser reaches it (natively, the SchedulerUrl's).
    assert set(docker["Dicomflow"]) == set(native["Dicomflow"]) | {"StatusPageUrl"}
    port = config["DICOMFLOW_SCHEDULER_PORT"]
    assert docker["Dicomflow"]["StatusPageUrl"] == f"http://127.0.0.1:{port}/"
    native["Dicomflow"]["SchedulerUrl"] = f"http://scheduler:{port}"  # the scheduler container, on its port
    for key in set(native["Dicomflow"]) - {"SpoolPath", "Tags"}:
        assert docker["Dicomflow"][key] == native["Dicomflow"][key], key
    # The plugin reads both alike (the tags as a comma-separated string there), but for where
    # the storage and the spool are (the volume orthanc-data).
    where = {key: docker[key] for key in ("StorageDirectory", "IndexDirectory")}
    assert PluginSettings.from_configuration(docker) == PluginSettings.from_configuration(
        {**native, **where, "Dicomflow": {**native["Dicomflow"], "SpoolPath": docker["Dicomflow"]["SpoolPath"]}})
    # Every Orthanc setting is in ORTHANC_JSON, or Compose handles it another way (said why).
    raw = json.dumps(orthanc)
    for field in OrthancSettings.model_fields.values():
        assert field.alias in ORTHANC_IN_DOCKER or "${" + field.alias in raw, field.alias
    # The plugin and dicomflow/dicomheader.py, from the mounted repository folders.
    volumes = orthanc["volumes"]
    assert "./orthanc:/dicomflow/orthanc:ro" in volumes and "./dicomflow:/dicomflow/dicomflow:ro" in volumes
    assert (REPO / "orthanc" / "dicomflow_plugin.py").is_file()


def test_images_are_pinned_and_every_service_has_a_healthcheck(compose):
    for name, service in compose["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image} is not pinned"
        if "build" not in service:  # pulled: a version, not a moving tag
            assert re.fullmatch(r"\d+\.\d+\.\d+(-[a-z0-9]+)?", tag), f"{name}: {image}"
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
        if test[1:3] == ["python", "-c"]:
            compile(interpolate(test[3], {}), f"{name} healthcheck", "exec")  # raises on a syntax error
    assert compose["services"]["orthanc"]["image"].startswith("orthancteam/orthanc:")


def test_folders_are_mounted_at_their_host_paths(compose, config, tmp_path):
    declared = set(compose["volumes"])
    worker = compose["services"]["worker"]
    given = {**config, **{name: str(tmp_path / name.lower()) for name in FOLDERS if name != "DICOMFLOW_HOME"}}
    mounts = {tuple(mount.split(":")[:2]) for mount in resolved(worker["volumes"], given)}
    for name in FOLDERS:
        assert (given[name], given[name]) in mounts, name
    # Left unset: an unused named volume (declared), the setting stays unset (its service off).
    unset = {k: v for k, v in config.items() if k not in FOLDERS or k == "DICOMFLOW_HOME"}
    for mount in resolved(worker["volumes"], unset):
        source = mount.split(":")[0]
        assert source.startswith(("/", "./")) or source in declared, mount
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source.startswith(("/", "./", "$")) or source in declared, (name, mount)
    # The same services folder and state as the scheduler and dashboard, as the same user.
    for name in DICOMFLOW_SERVICES:
        assert compose["services"][name]["volumes"] == worker["volumes"]
        user = resolved(compose["services"][name]["user"], {"DICOMFLOW_UID": "1234", "DICOMFLOW_GID": "99"})
        assert user == "1234:99", name


def test_ports_bind_to_loopback_and_the_dicom_port_where_configured(compose, config):
    published = {name: resolved(service.get("ports", []), config) for name, service in compose["services"].items()}
    assert all(port.startswith("127.0.0.1:") for ports in published.values() for port in ports), published
    assert f"127.0.0.1:{config['ORTHANC_DICOM_PORT']}:4242" in published["orthanc"]
    # The scheduler and the dashboard listen on the file's ports inside their containers too.
    for name, setting in (("scheduler", "DICOMFLOW_SCHEDULER_PORT"), ("dashboard", "DICOMFLOW_DASHBOARD_PORT")):
        assert published[name] == [f"127.0.0.1:{config[setting]}:{config[setting]}"]
        assert f":{config[setting]}/" in " ".join(resolved(compose["services"][name]["healthcheck"]["test"], config))
    opened = resolved(compose["services"]["orthanc"]["ports"], {**config, "ORTHANC_DICOM_BIND": "0.0.0.0"})
    assert f"0.0.0.0:{config['ORTHANC_DICOM_PORT']}:4242" in opened
    assert f"127.0.0.1:{config['ORTHANC_HTTP_PORT']}:8042" in opened  # Orthanc's HTTP stays on loopback


def test_the_worker_healthcheck_sees_its_own_worker(compose, connection, redis_url):
    """Run as written, against a real Redis: healthy once a worker of this host is registered."""
    import rq

    test = compose["services"]["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    check = lambda: subprocess.run([sys.executable, *test[2:]], env={**os.environ, "DICOMFLOW_REDIS_URL": redis_url},  # noqa: E731
                                   capture_output=True, timeout=30).returncode
    assert test[1] == "python" and check() == 1
    worker = rq.Worker(["default"], connection=connection)
    worker.register_birth()
    try:
        assert check() == 0
    finally:
        worker.register_death()
    assert check() == 1


def test_compose_itself_reads_the_file_so(config, tmp_path):
    """Debian's docker-compose (1.29, .ci/run installs it; `config` needs no engine) reads the
    file with the configuration run.sh writes: every setting reaches every container of dicomflow's."""
    home = Path(config["DICOMFLOW_HOME"])
    home.mkdir(parents=True)
    lines = [f"{key}='{value}'" for key, value in config.items()] + ["CHRIS_TOKEN='t0ken'", "NATS_URL='nats://n:4222'"]
    (home / "dicomflow.env").write_text("\n".join(lines) + "\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DICOMFLOW_UID": "1234", "DICOMFLOW_GID": "99"}
    done = subprocess.run(["docker-compose", "-p", "dicomflow", "--env-file", str(home / "dicomflow.env"),
                           "-f", str(COMPOSE), "config"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = yaml.safe_load(done.stdout)
    expected = {**parse_env_file((home / "dicomflow.env").read_text())}
    for name in DICOMFLOW_SERVICES:
        environment = seen["services"][name]["environment"]
        overridden = set(CONTAINER_OVERRIDES) | {LISTENS.get(name)}
        for key, value in expected.items():
            assert key in overridden or str(environment[key]) == value, (name, key)
    assert "CHRIS_TOKEN" not in seen["services"]["orthanc"]["environment"]
    assert seen["services"]["worker"]["environment"]["DICOMFLOW_REDIS_URL"] == \
        f"redis://:{config['DICOMFLOW_REDIS_PASSWORD']}@redis:6379/0"
    assert seen["services"]["worker"]["user"] == "1234:99"
    orthanc = json.loads(seen["services"]["orthanc"]["environment"]["ORTHANC_JSON"])
    assert orthanc["Dicomflow"]["Token"] == config["DICOMFLOW_SCHEDULER_TOKEN"]
    assert orthanc["RegisteredUsers"] == {config["ORTHANC_USERNAME"]: config["ORTHANC_PASSWORD"]}
    assert seen["services"]["scheduler"]["ports"] == [
        f"127.0.0.1:{config['DICOMFLOW_SCHEDULER_PORT']}:{config['DICOMFLOW_SCHEDULER_PORT']}/tcp"]


# ---- service.sh in Docker mode ------------------------------------------------------------------

#: Stands in for the docker command, which cannot run here: `docker info` answers (an engine
#: runs), and every call is written to $DOCKER_CALLS, one argument per line, then a blank line.
DOCKER = """#!/bin/sh
[ "$1" = info ] && exit 0
for arg in "$@"; do printf '%s\\n' "$arg"; done >> "$DOCKER_CALLS"
echo >> "$DOCKER_CALLS"
"""


@pytest.fixture()
def docker_mode(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(DOCKER)
    (bin_dir / "docker").chmod(0o755)
    home = tmp_path / "state"
    home.mkdir()
    (home / "dicomflow.env").write_text(f"DICOMFLOW_HOME={home}\n")
    calls = tmp_path / "calls"
    env = {k: v for k, v in os.environ.items() if k not in ("DICOMFLOW_PYTHON", "DICOMFLOW_NATIVE", "DICOMFLOW_CONFIG")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", DICOMFLOW_HOME=str(home), DOCKER_CALLS=str(calls))

    def run(*args: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        done = subprocess.run(["bash", str(REPO / "service.sh"), *args], env=env, capture_output=True, text=True,
                              timeout=30, cwd=tmp_path)
        recorded = calls.read_text().split("\n\n") if calls.exists() else []
        calls.unlink(missing_ok=True)
        return done, [c.split("\n") for c in recorded if c.strip()]
    run.home = home
    return run


def test_service_sh_parses_and_answers_help_without_a_venv_or_docker():
    assert subprocess.run(["bash", "-n", str(REPO / "service.sh")]).returncode == 0
    env = {**os.environ, "PATH": "/usr/bin:/bin", "DICOMFLOW_PYTHON": ""}
    done = subprocess.run(["bash", str(REPO / "service.sh"), "--help"], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "Docker mode" in done.stdout


def test_service_sh_in_docker_mode_runs_the_installer_in_the_stacks_image(docker_mode, tmp_path):
    source = REPO / "examples" / "temp"
    done, calls = docker_mode("install", "temp", "-p", str(source))
    assert done.returncode == 0, done.stderr
    run = calls[0]
    assert run[:3] == ["compose", "-p", "dicomflow"] and f"{docker_mode.home}/dicomflow.env" in run
    assert run[run.index("--project-directory") + 1] == str(REPO)
    tail = run[run.index("run"):]
    assert tail[:4] == ["run", "--rm", "--no-deps", "-T"]
    assert f"{source}:/incoming/service:ro" in tail and "DICOMFLOW_SCHEDULER_HOST=scheduler" in tail
    assert tail[tail.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    assert tail[tail.index("scheduler"):] == ["scheduler", "python", "-P", "-m", "scheduler.installer",
                                              "install", "temp", "-p", "/incoming/service"]
    assert calls[1][-3:] == ["ps", "-q", "worker"]  # then the image is rebuilt where workers run
    # A backup folder's parent is mounted; the name is kept.
    done, calls = docker_mode("remove", "temp", "-b", "backups/temp-1", "--force")
    assert done.returncode == 0, done.stderr
    tail = calls[0][calls[0].index("run"):]
    assert f"{tmp_path / 'backups'}:/incoming/backups" in tail
    assert tail[tail.index("scheduler.installer") + 1:] == ["remove", "temp", "-b", "/incoming/backups/temp-1",
                                                            "--force"]
    assert len(calls) == 1  # no rebuild after a remove
    # Bad input: a missing folder is named, nothing runs.
    done, calls = docker_mode("install", "temp", "-p", str(tmp_path / "nowhere"))
    assert done.returncode == 1 and "nowhere is not a folder" in done.stderr and not calls


def test_service_sh_in_docker_mode_needs_the_configuration(docker_mode):
    (docker_mode.home / "dicomflow.env").unlink()
    done, calls = docker_mode("check", "temp", "-p", str(REPO / "examples" / "temp"))
    assert done.returncode == 1 and "start the stack once" in done.stderr and not calls
