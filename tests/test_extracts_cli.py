"""`dicomflow-export` and /api/v1/exports (issue 19): list, status, retry, force over the export records."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from rq import Queue

from dicomflow.extracts.cli import main
from dicomflow.extracts.records import open_records
from tests.conftest import REPO
from tests.support.extracts import (
    DEID_MODULE,
    copy_study,
    extracts_config,
    load_package,
    pacs_project,
    postgres_url,  # noqa: F401 - fixture
    project_folder,
)
from tests.support.procs import wait_for
from tests.support.services import AUTH
from tests.support.stack import Pipeline, diagnostics

SECRET = "cli-project-secret-0123456789"
COUNT = 6
#: Project `mr`: the MR studies.
MR_PROJECT = "slug: mr\nstudies: {modalities: [MR]}\nsecret: {env: CLI_SECRET}\n"

deid_module = load_package(DEID_MODULE, "deid_module_under_cli_test")
worker = deid_module.worker


@pytest.fixture()
def study(sag_anon, tmp_path) -> Path:
    return copy_study(sag_anon, tmp_path / "study", COUNT)


@pytest.fixture(params=["sqlite", "postgresql"])
def env(request, tmp_path, monkeypatch, redis_url):
    """Projects `mr` (a local export) and `pacs` (a DICOM destination whose URL is not set), the
    configuration in the environment (as the command reads it), and the records' database."""
    projects = project_folder(tmp_path, {"mr": MR_PROJECT,
                                         "pacs": pacs_project("no-such-pacs", "DFTEST_NO_PACS1", "CLI_SECRET")})
    config = extracts_config(projects, tmp_path, DICOMFLOW_REDIS_URL=redis_url, DICOMFLOW_CONFIG="")
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
        config["DICOMFLOW_DB_URL"] = url
        records = open_records(url)
        with records.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM study_exports")
        records.dispose()
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CLI_SECRET", SECRET)
    return config


def _export(env, study, projects=("mr", "pacs")):
    """Run the deid worker on the study as a job would (event with Orthanc instance ids)."""
    kwargs = dict(jobName="deid", headers={"StudyInstanceUID": _uid(study)}, params={},
                  added_params={"deid": {"projects": list(projects)}}, dcmpath=str(study),
                  event={"level": "study", "orthanc": {"instances": ["i1", "i2"], "study": "s"},
                         "remoteAet": "MODALITY"}, config=env)
    try:
        return worker(**kwargs)
    except deid_module.ExtractFailed as exc:   # the pacs project fails (no such destination): the job fails
        return exc


def _uid(study: Path) -> str:
    return str(pydicom.dcmread(next(study.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_and_status(env, study, capsys):
    _export(env, study)
    code, out, _ = run(capsys, "list", "mr", "--json")
    [row] = json.loads(out)
    assert code == 0 and row["status"] == "done" and row["instances"] == COUNT and row["destinations"] == ["local"]
    code, out, _ = run(capsys, "list", "pacs", "--status", "failed")
    assert code == 0 and "failed" in out and "no-such-pacs" in out and row["studyId"] not in out
    code, out, _ = run(capsys, "list", "pacs", "--status", "done")
    assert code == 0 and "no study recorded as done" in out
    code, out, _ = run(capsys, "status", "mr")
    assert code == 0 and json.loads(out)["studies"]["done"] == 1 and json.loads(out)["instancesExported"] == COUNT
    for ref in (row["studyId"], _uid(study)):    # the pseudonymised UID, or the original one (by its hash)
        code, out, _ = run(capsys, "status", "mr", ref)
        shown = json.loads(out)
        assert code == 0 and shown["id"] == row["id"] and [h["status"] for h in shown["history"]] == ["done"]
    code, _, err = run(capsys, "status", "mr", "1.2.3.4")
    assert code == 1 and "project mr has no exported study 1.2.3.4" in err
    code, _, err = run(capsys, "list", "Not/A/Slug")
    assert code == 1 and "is not a project slug" in err
    assert run(capsys, "status")[0] == 2 and run(capsys, "list", "mr", "--status", "nope")[0] == 2


def test_retry_and_force_queue_the_job_again_and_it_exports(env, study, capsys, connection):
    _export(env, study)
    code, _, err = run(capsys, "retry", "mr")
    assert code == 1 and "no failed or partial study" in err
    code, _, err = run(capsys, "retry", "mr", _uid(study))
    assert code == 1 and "is done: nothing to re-run (use force" in err
    code, out, _ = run(capsys, "retry", "pacs")
    [queued] = json.loads(out)["queued"]
    assert code == 0 and queued["previousStatus"] == "failed"
    job = Queue("low", connection=connection).fetch_job(queued["job"])
    assert job.func_name == "worker.runtime.run_service_job"
    assert job.kwargs["added_params"] == {"deid": {"projects": ["pacs"]}} and job.kwargs["headers"] == {}
    assert job.kwargs["event"]["orthanc"] == {"instances": ["i1", "i2"]} and job.kwargs["worker"] == "deid.worker"
    code, out, _ = run(capsys, "list", "pacs", "--json")
    assert json.loads(out)[0]["status"] == "requested"
    # force a done study: queued, and the job (files fetched again, no headers) exports it again
    code, out, _ = run(capsys, "force", "mr", _uid(study))
    [forced] = json.loads(out)["queued"]
    assert code == 0 and forced["previousStatus"] == "done"
    job = Queue("low", connection=connection).fetch_job(forced["job"])
    result = worker(**{**job.kwargs, "dcmpath": str(study), "config": env})
    assert result["projects"]["mr"]["status"] == "done"
    code, out, _ = run(capsys, "status", "mr", forced["studyId"])
    assert [h["status"] for h in json.loads(out)["history"]] == ["done", "done"]
    # and once done, the same job run again (at least once) exports nothing
    assert worker(**{**job.kwargs, "dcmpath": str(study), "config": env})["projects"]["mr"]["status"] == \
        "already-exported"


def test_the_api_answers_what_the_command_does(env, study, make_client, connection):
    _export(env, study)
    client = make_client(**{k: v for k, v in env.items() if k != "DICOMFLOW_REDIS_URL"})
    assert client.get("/api/v1/exports/mr").status_code == 401
    body = client.get("/api/v1/exports/mr", headers=AUTH).get_json()
    assert body["studies"]["done"] == 1 and body["studyList"][0]["instances"] == COUNT
    study_id = body["studyList"][0]["studyId"]
    assert client.get("/api/v1/exports/pacs?status=failed", headers=AUTH).get_json()["studyList"][0]["status"] \
        == "failed"
    assert client.get("/api/v1/exports/mr?status=bogus", headers=AUTH).status_code == 400
    one = client.get(f"/api/v1/exports/mr/studies/{_uid(study)}", headers=AUTH).get_json()
    assert one["studyId"] == study_id and len(one["history"]) == 1
    missing = client.get("/api/v1/exports/mr/studies/1.2.3", headers=AUTH)
    assert missing.status_code == 404 and missing.get_json()["error"] == "not-found"
    assert client.post("/api/v1/exports/mr/retry", headers=AUTH).status_code == 404       # nothing failed
    assert client.post("/api/v1/exports/mr/retry", headers=AUTH, json={"study": 5}).status_code == 400
    queued = client.post("/api/v1/exports/pacs/retry", headers=AUTH)
    assert queued.status_code == 202 and queued.get_json()["queued"][0]["previousStatus"] == "failed"
    assert Queue("low", connection=connection).fetch_job(queued.get_json()["queued"][0]["job"]) is not None
    forced = client.post("/api/v1/exports/mr/force", headers=AUTH, json={"study": study_id})
    assert forced.status_code == 202 and forced.get_json()["queued"][0]["studyId"] == study_id


def test_a_failed_export_is_retried_through_the_api_end_to_end(tmp_path, redis_url, connection, sag_anon):
    """A local export that fails (its folder is blocked) is recorded failed; unblocked, POST retry
    queues the deid job again, which fetches the study from Orthanc again and exports it."""
    projects = project_folder(tmp_path, {"mr": MR_PROJECT})
    out = tmp_path / "extracts"
    out.mkdir()
    (out / "mr").write_text("in the way")                 # the export cannot make its folder
    study = copy_study(sag_anon, tmp_path / "study", COUNT)
    config = {"DICOMFLOW_PROJECTS_DIR": str(projects), "DICOMFLOW_EXTRACTS_DIR": str(out), "CLI_SECRET": SECRET}
    with Pipeline(tmp_path / "stack", redis_url, REPO / "services", stable_age=2, extra_config=config) as stack:
        records = open_records(f"sqlite:///{tmp_path / 'stack' / 'home' / 'exports.db'}")

        def status() -> str | None:
            rows = records.studies("mr")
            return rows[0]["status"] if rows else None

        try:
            stack.orthanc.store([study], aet="MODALITY", pattern="*.dcm")
            wait_for(lambda: status() == "failed", timeout=120, what="the export recorded as failed")
            (out / "mr").unlink()
            answer = stack.session.post(stack.scheduler_url + "/api/v1/exports/mr/retry", timeout=10)
            assert answer.status_code == 202, answer.text
            wait_for(lambda: status() == "done", timeout=120, what="the retried export recorded as done")
        except TimeoutError as exc:
            raise AssertionError(diagnostics(stack)) from exc
    [row] = records.studies("mr")
    assert row["instances"] == COUNT and len(list((out / "mr").rglob("*.dcm"))) == COUNT
    assert "de-identification failed" in records.history(row["id"])[0]["reason"]
    records.dispose()
