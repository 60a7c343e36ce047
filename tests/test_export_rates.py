"""A destination's rate changed at run time without a restart: `dicomflow-export rate DEST [N|default]`
and /api/v1/destinations (token-authenticated), over a real redis-server and real project files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dicomflow.extracts.cli import main
from dicomflow.ratelimit import BucketKeys, TokenBucket
from tests.conftest import REPO
from tests.support.exports import write_project
from tests.support.services import AUTH


@pytest.fixture()
def projects(tmp_path):
    folder = tmp_path / "projects"
    write_project(folder, {"research-pacs": {"type": "dicomweb", "secrets": {"envPrefix": "X"}, "rate": 5},
                           "research-ftps": {"type": "ftps", "secrets": {"envPrefix": "Y"}, "rate": 2}},
                  slug="lung-ct", dicom=["research-pacs"], parquet=["research-ftps"])
    write_project(folder, {"research-pacs": {"type": "dicomweb", "secrets": {"envPrefix": "X"}, "rate": 5}},
                  slug="brain-mr", dicom=["research-pacs"])
    return folder


@pytest.fixture()
def cli_env(monkeypatch, projects, redis_url):
    monkeypatch.setenv("DICOMFLOW_CONFIG", "")
    monkeypatch.setenv("DICOMFLOW_PROJECTS_DIR", str(projects))
    monkeypatch.setenv("DICOMFLOW_REDIS_URL", redis_url)


def _run(capsys, *args) -> tuple[int, dict | str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else err)


def test_the_cli_shows_sets_and_resets_a_rate_that_running_buckets_follow(cli_env, capsys, connection):
    bucket = TokenBucket(connection, BucketKeys.named("research-pacs"), rate=5)   # a worker's, already running
    code, shown = _run(capsys, "rate", "research-pacs")
    assert code == 0 and shown["rate"] == 5 and shown["override"] is None
    assert shown["configured"] == {"brain-mr": 5, "lung-ct": 5} and shown["type"] == "dicomweb"
    code, shown = _run(capsys, "rate", "research-pacs", "12.5")
    assert code == 0 and shown["rate"] == 12.5 and shown["override"] == 12.5
    assert bucket.rate() == 12.5                                    # no restart: the next token uses it
    code, shown = _run(capsys, "rate", "research-pacs", "default")
    assert code == 0 and shown["rate"] == 5 and shown["override"] is None and bucket.rate() == 5


@pytest.mark.parametrize(("args", "message"), [
    (("rate", "no-such-dest", "3"), "no project in"),
    (("rate", "research-pacs", "fast"), "not 'fast'"),
    (("rate", "research-pacs", "-1"), ">= 0"),
])
def test_the_cli_refuses_unknown_destinations_and_bad_rates(cli_env, capsys, connection, args, message):
    code, err = _run(capsys, *args)
    assert code == 1 and message in err
    assert connection.keys("dicomflow:ratelimit:*") == []


def test_the_installed_command_runs(projects, redis_url, connection):
    script = REPO / ".venv" / "bin" / "dicomflow-export"
    program = [str(script)] if script.exists() else [sys.executable, "-m", "dicomflow.extracts.cli"]
    env = {**os.environ, "DICOMFLOW_CONFIG": "", "DICOMFLOW_PROJECTS_DIR": str(projects),
           "DICOMFLOW_REDIS_URL": redis_url}
    done = subprocess.run([*program, "rate", "research-ftps", "0.5"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rate"] == 0.5
    assert connection.get(BucketKeys.named("research-ftps").rate) == b"0.5"


def test_the_api_lists_shows_and_changes_rates(make_client, projects, connection):
    client = make_client(DICOMFLOW_PROJECTS_DIR=str(projects))
    assert client.get("/api/v1/destinations").status_code == 401
    assert client.put("/api/v1/destinations/research-pacs/rate", json={"rate": 1}).status_code == 401
    listed = client.get("/api/v1/destinations", headers=AUTH).get_json()["destinations"]
    assert [(d["destination"], d["rate"]) for d in listed] == [("research-ftps", 2), ("research-pacs", 5)]
    answer = client.put("/api/v1/destinations/research-pacs/rate", json={"rate": 20}, headers=AUTH)
    assert answer.status_code == 200 and answer.get_json()["rate"] == 20
    assert TokenBucket(connection, BucketKeys.named("research-pacs"), rate=5).rate() == 20
    assert client.get("/api/v1/destinations/research-pacs/rate", headers=AUTH).get_json()["override"] == 20
    answer = client.put("/api/v1/destinations/research-pacs/rate", json={"rate": None}, headers=AUTH)
    assert answer.get_json()["rate"] == 5 and answer.get_json()["override"] is None
    for body in ({"rate": -2}, {"rate": "fast"}, {"rate": True}, {}, [1]):
        answer = client.put("/api/v1/destinations/research-pacs/rate", json=body, headers=AUTH)
        assert answer.status_code == 400 and answer.get_json()["error"] == "bad-request", body
    answer = client.put("/api/v1/destinations/nowhere/rate", json={"rate": 1}, headers=AUTH)
    assert answer.status_code == 404 and "nowhere" in answer.get_json()["message"]
    assert connection.keys("dicomflow:ratelimit:*") == []


def test_the_readme_project_example_loads(tmp_path):
    """README's "Research exports" example is a complete project file that validates."""
    import re

    from dicomflow.extracts.project import load_project

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Research exports"):]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    (tmp_path / "lung-ct.yaml").write_text(example)
    (tmp_path / "cohort.csv").write_text("PatientID\nP1\n")
    project = load_project(tmp_path / "lung-ct.yaml")
    endpoints = project.model.destinations.endpoints
    assert endpoints["research-pacs"].type == "dicomweb" and endpoints["research-pacs"].rate == 5
    assert endpoints["research-ftps"].type == "ftps" and project.model.destinations.parquet == ("research-ftps",)
    assert len(example.splitlines()) <= 30
