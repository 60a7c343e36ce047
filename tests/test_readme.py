"""The README works as written (issue 21): its shell examples that can run here are run, and
every setting, route and command it (or a page of docs/) names exists.

Runnable examples are the ```bash blocks preceded by a `<!-- readme-test: KIND -->` line:
- `services`: run as they are, with HOME and the services folder in a scratch folder;
- `help`: run as they are;
- `stack`, then `stop`: run in one bash session, in order, in a scratch clone of the
  repository (symlinks, with a state/ folder of its own) on free ports, after `bash run.sh`
  (the README's first command, without build.sh). `/path/to/folder/` is the one placeholder:
  it becomes a folder with two DICOM files and a README.md.
Every other block is checked for its names only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from dicomflow.config import parse_env_file
from tests.conftest import REPO
from tests.support.orthanc import write_series
from tests.support.procs import free_port

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]

#: A configuration name: the prefixes dicomflow.config reads from the environment.
SETTING = re.compile(r"\b(?:DICOMFLOW|ORTHANC|CHRIS|REPACK|NATS|EXPORT|REDIS_STORE)_[A-Z0-9_]*[A-Z0-9]\b")
#: Where the code reads its configuration (tests and docs excluded).
CODE_DIRS = ("dicomflow", "scheduler", "worker", "orthanc", "services")
CODE_FILES = ("run.sh", "build.sh", "service.sh", "docker-compose.yml", "Dockerfile")
#: Names of that shape in the code that are not settings: constants, and Orthanc's Docker image's
#: own environment variables (ORTHANC__*, ORTHANC_JSON) that docker-compose.yml sets from ours.
NOT_SETTINGS = {"ORTHANC_CHARSETS", "ORTHANC_ID", "ORTHANC_TIMEOUT", "ORTHANC_JSON"}

BLOCK = re.compile(r"(?:<!-- readme-test: (?P<kind>[a-z]+) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def blocks(kind: str | None = None, page: Path = README) -> list[str]:
    return [m["body"] for m in BLOCK.finditer(page.read_text()) if kind is None or m["kind"] == kind]


def _code_paths() -> list[Path]:
    paths = [REPO / name for name in CODE_FILES if (REPO / name).is_file()]
    for folder in CODE_DIRS:
        paths += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".sh", ".lua", ".json")]
    return paths


def _code_text(committed: bool = False) -> str:
    """The code's text; `committed`: as of git's HEAD when this is a git checkout (so that a
    colleague's uncommitted work does not fail this test before it is committed)."""
    if committed and (REPO / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "--", *CODE_DIRS, *CODE_FILES],
                                capture_output=True, text=True)
        if listed.returncode == 0:
            texts = []
            for path in listed.stdout.splitlines():
                if Path(path).suffix in (".py", ".sh", ".lua", ".json", ".yml", ""):
                    shown = subprocess.run(["git", "-C", str(REPO), "show", f"HEAD:{path}"],
                                           capture_output=True, text=True, errors="replace")
                    texts.append(shown.stdout)
            return "\n".join(texts)
    return "\n".join(p.read_text(errors="replace") for p in _code_paths())


# ---- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_setting_named_is_read_by_the_code(page):
    """A setting renamed in the code without updating the README or docs fails here."""
    code = set(SETTING.findall(_code_text()))
    named = set(SETTING.findall(page.read_text()))
    assert named or page != README
    assert named <= code, f"{page.name} names settings the code does not read: {sorted(named - code)}"


def test_every_setting_the_code_reads_is_in_docs_configuration():
    """docs/configuration.md is the list of every setting (committed code)."""
    code = {n for n in SETTING.findall(_code_text(committed=True))
            if n not in NOT_SETTINGS and not n.startswith("ORTHANC__")}
    documented = set(SETTING.findall((REPO / "docs" / "configuration.md").read_text()))
    assert code <= documented, f"settings missing from docs/configuration.md: {sorted(code - documented)}"


def test_readme_is_one_page():
    assert len(README.read_text().splitlines()) < 350


def test_links_to_docs_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(((?!https?:)[^)#]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


ROUTE = re.compile(r"(?<![\w.])/api/v1/[A-Za-z0-9_<>/.-]*[A-Za-z0-9_>]|(?<=PORT)/health\b")
#: `$API` in the README's examples is http://host:port/api/v1.
API_VAR = re.compile(r"\$API(/[A-Za-z0-9_<>/.-]*[A-Za-z0-9_>])")


def _documented_routes() -> set[str]:
    found = set()
    for page in PAGES:
        text = page.read_text()
        found |= set(ROUTE.findall(text))
        found |= {"/api/v1" + r for r in API_VAR.findall(text)}
    return found


def test_every_api_route_named_exists(make_client):
    app = make_client().application
    rules = [re.sub(r"<[^>]+>", "[^/]+", rule.rule) for rule in app.url_map.iter_rules()]
    routes = _documented_routes()
    assert "/api/v1/pushes" in routes and "/api/v1/services/<jobName>/resume" in routes
    for route in sorted(routes):
        concrete = re.sub(r"<[^>]+>", "X", route)
        assert any(re.fullmatch(rule, concrete) for rule in rules), f"{route} is not a route of the scheduler"


def test_every_plugin_route_named_exists():
    plugin = "".join(path.read_text() for path in (REPO / "orthanc").glob("dicomflow_*.py"))
    patterns = re.findall(r'RegisterRestCallback\("([^"]+)"', plugin)
    assert patterns
    for page in PAGES:
        for route in re.findall(r"(?<![\w.])(/dicomflow/[a-z/]+[a-z])", page.read_text()):
            assert any(re.fullmatch(p, route) for p in patterns), f"{page.name}: {route} is not a plugin route"


COMMAND = re.compile(r"bash (run\.sh|service\.sh)((?: +[A-Za-z0-9_.~/$-]+)*)")


def _commands() -> set[tuple[str, tuple[str, ...]]]:
    found = set()
    for page in PAGES:
        for script, rest in COMMAND.findall(page.read_text()):
            found.add((script, tuple(rest.split())))
    return found


def test_every_run_sh_and_service_sh_command_named_is_accepted():
    """Each subcommand answers --help (exit 0), and each option used is in that help."""
    env = {**os.environ, "DICOMFLOW_PYTHON": sys.executable, "DICOMFLOW_NATIVE": "1"}
    commands = _commands()
    assert ("run.sh", ("restart",)) in commands and ("run.sh", ("--workers", "3")) in commands
    for script, words in sorted(commands):
        known = {"run.sh": {"start", "status", "stop", "restart", "env"},
                 "service.sh": {"install", "check", "backup", "remove"}}[script]
        sub = next((w for w in words if not w.startswith("-") and w in known | {"help"}), None)
        if sub is None and words and not words[0].startswith("-") and words[0] != "COMMAND":
            pytest.fail(f"bash {script} {' '.join(words)}: {words[0]!r} is not a command of {script}")
        args = [sub, "--help"] if sub and sub != "help" else ["--help"]
        done = subprocess.run(["bash", str(REPO / script), *args], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, (script, words, done.stderr)
        for word in words:
            if word.startswith("-") and word not in ("-h", "--help"):
                assert word in done.stdout, f"bash {script} {' '.join(words)}: {word} is not in its help"
        if script == "run.sh" and sub == "restart" and "workers" in words:
            assert "restart workers" in done.stdout


# ---- running the examples -------------------------------------------------------------------

def test_the_service_examples_run(tmp_path, redis_url):
    script = "\n".join(blocks("services"))
    assert "service.sh backup temp" in script and "service.sh remove temp -b" in script
    env = {**os.environ, "HOME": str(tmp_path), "DICOMFLOW_SERVICES_DIR": str(tmp_path / "services"),
           "DICOMFLOW_PYTHON": sys.executable, "DICOMFLOW_REDIS_URL": redis_url, "DICOMFLOW_CONFIG": "",
           "DICOMFLOW_SCHEDULER_PORT": str(free_port()), "DICOMFLOW_SCHEDULER_TOKEN": "t"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tempfollow (tempFollowJob depends on tempJob)" in done.stderr
    assert "refused: tempfollow depends on it" in done.stdout
    assert (tmp_path / "services/registry/temp/settings.json").is_file()
    assert (tmp_path / "dicomflow-backups/temp/registry/settings.json").is_file()


def test_the_help_examples_run():
    env = {**os.environ, "DICOMFLOW_PYTHON": sys.executable}
    for block in blocks("help"):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr


@pytest.fixture()
def clone(tmp_path) -> Path:
    """The repository as a user's clone: symlinks to its files, a state/ folder of its own."""
    root = tmp_path / "dicomflow"
    root.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in ("state", ".git") and not entry.name.startswith(".pytest"):
            (root / entry.name).symlink_to(entry)
    return root


def test_the_stack_examples_run(clone, tmp_path):
    folder = tmp_path / "folder"
    write_series(folder, 2, patient_id="README01")
    (folder / "README.md").write_text("not DICOM\n")
    stack = "\n".join(blocks("stack"))
    assert "/path/to/folder/" in stack
    script = "bash run.sh\n" + stack.replace("/path/to/folder/", f"{folder}/")
    ports = {name: str(free_port()) for name in ("DICOMFLOW_REDIS_PORT", "DICOMFLOW_SCHEDULER_PORT",
                                                 "DICOMFLOW_DASHBOARD_PORT", "ORTHANC_HTTP_PORT", "ORTHANC_DICOM_PORT")}
    env = {**os.environ, **ports, "HOME": str(tmp_path), "DICOMFLOW_NATIVE": "1", "TCP_NODELAY": "1"}
    for name in ("DICOMFLOW_CONFIG", "DICOMFLOW_HOME", "DICOMFLOW_SERVICES_DIR"):
        env.pop(name, None)
    run = lambda text: subprocess.run(["bash", "-euo", "pipefail", "-c", text], cwd=clone, env=env,  # noqa: E731
                                      capture_output=True, text=True, timeout=600)
    try:
        done = run(script)
        assert done.returncode == 0, done.stdout + done.stderr
        values = parse_env_file((clone / "state" / "dicomflow.env").read_text())
        orthanc = f"http://127.0.0.1:{values['ORTHANC_HTTP_PORT']}"
        stats = requests.get(orthanc + "/statistics", timeout=5,
                             auth=(values["ORTHANC_USERNAME"], values["ORTHANC_PASSWORD"])).json()
        assert stats["CountInstances"] == 3, stats  # the sample, and the folder's two DICOM files
        assert f"skipped (not DICOM): {folder}/README.md" in done.stderr  # dicomflow-send went on past it
        services = requests.get(f"http://127.0.0.1:{values['DICOMFLOW_SCHEDULER_PORT']}/api/v1/services",
                                headers={"Authorization": f"Bearer {values['DICOMFLOW_SCHEDULER_TOKEN']}"},
                                timeout=5).json()
        assert "repack" in {job["jobName"] for job in services["jobs"]}, "REPACK_DATADIR applied by the restart"
        assert re.findall(r"^worker-(\d+)\s+RUNNING", done.stdout, re.M) == ["0", "1", "2"]
        stopped = run("\n".join(blocks("stop")))
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    finally:
        subprocess.run(["bash", str(clone / "run.sh"), "stop"], cwd=clone, env=env, capture_output=True, timeout=180)
