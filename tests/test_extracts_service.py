"""The deid service (issue 19): a study push de-identified once per project it belongs to."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
import sqlalchemy as sa

from dicomflow.errors import ConfigError
from dicomflow.extracts.deid import Deidentifier, Profile
from dicomflow.extracts.records import open_records
from scheduler.registry import load_registry
from tests.conftest import REPO
from tests.support.extracts import (
    DEID_MODULE,
    DEID_REGISTRY,
    copy_study,
    extracts_config,
    load_package,
    pacs_project,
    postgres_url,  # noqa: F401 - fixture
    project_folder,
)
from tests.support.procs import free_port, wait_for
from tests.support.stack import Pipeline, diagnostics

SECRETS = {"MR_SECRET": "mr-project-secret-0123456789", "ALL_SECRET": "all-project-secret-0123456789"}
COUNT = 12

callback = load_package(DEID_REGISTRY, "deid_registry_under_test").callback
worker = load_package(DEID_MODULE, "deid_module_under_test").worker


@pytest.fixture()
def study(sag_anon, tmp_path) -> Path:
    """COUNT instances of sag-anon (one MR series), as Orthanc would hand them to a study job."""
    return copy_study(sag_anon, tmp_path / "study", COUNT)


@pytest.fixture()
def projects(tmp_path) -> Path:
    return project_folder(tmp_path, {
        "mr": "slug: mr\nstudies: {modalities: [MR]}\nsecret: {env: MR_SECRET}\n"
              "series: {dropDescriptions: [localizer]}\n",
        "everything": "slug: everything\nstudies: {all: true}\nsecret: {env: ALL_SECRET}\n",
        "ct": "slug: ct\nstudies: {modalities: [CT]}\nsecret: {env: MR_SECRET}\n",
        "scanner": "slug: scanner\nstudies: {callingAeTitles: [CT_SCANNER]}\nsecret: {env: MR_SECRET}\n",
        "few": "slug: few\nstudies: {all: true}\nseries: {minInstances: 1000}\nsecret: {env: MR_SECRET}\n",
        "broken": "slug: broken\nstudies: {all: true}\nsecret: inline-secret\n",
    })


def headers_of(path: Path) -> dict[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {"PatientID": str(ds.PatientID), "StudyInstanceUID": str(ds.StudyInstanceUID), "Modality": ds.Modality}


def test_callback_names_the_projects_of_a_study(projects, study):
    config = {"DICOMFLOW_PROJECTS_DIR": str(projects)}
    headers = headers_of(next(study.glob("*.dcm")))
    wanted, added = callback(jobName="deid", headers=headers, params={}, added_params={},
                             event={"remoteAet": "MODALITY"}, config=config)
    # modalities are checked on the files by the worker: ct is a candidate here
    assert wanted and added["projects"] == ["ct", "everything", "few", "mr"]
    assert len(added["problems"]) == 1 and "broken.yaml [secret]" in added["problems"][0]
    for slug in ("everything", "few"):
        (projects / f"{slug}.yaml").unlink()
    for slug in ("mr", "ct"):
        (projects / f"{slug}.yaml").write_text(f"slug: {slug}\nstudies: {{modalities: [CT], callingAeTitles: [X]}}\n"
                                               "secret: {env: A}\n")
    assert not callback(jobName="deid", headers=headers, params={}, added_params={},
                        event={"remoteAet": "MODALITY"}, config=config)   # outside every project: nothing


def _dump(url: str) -> str:
    """Every value of every table of the export records, as one text."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return repr([conn.execute(sa.text(f"SELECT * FROM {t}")).all()
                         for t in ("study_exports", "export_attempts", "extracts")])
    finally:
        engine.dispose()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_worker_exports_each_project_once_and_records_it(projects, study, tmp_path, monkeypatch, database,
                                                         request):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "extracts"
    db_url = request.getfixturevalue("postgres_url") if database == "postgresql" else None
    config = extracts_config(projects, tmp_path, db_url)
    records = open_records(db_url or f"sqlite:///{tmp_path / 'home' / 'exports.db'}")
    with records.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM study_exports"))
    kwargs = dict(jobName="deid", headers=headers_of(next(study.glob("*.dcm"))), params={},
                  added_params={"deid": {"projects": ["ct", "everything", "few", "mr", "gone"]}},
                  dcmpath=str(study), event={"remoteAet": "MODALITY"}, config=config)
    result = worker(**kwargs)
    assert result["projects"]["ct"]["status"] == "not-selected"
    assert result["projects"]["gone"]["status"] == "gone"
    few = result["projects"]["few"]
    assert few["status"] == "empty" and few["droppedSeries"] == [{"series": few["droppedSeries"][0]["series"],
                                                                   "instances": COUNT}]
    assert result["projects"]["mr"]["written"] == result["projects"]["everything"]["written"] == COUNT
    assert result["projects"]["mr"]["status"] == "done" and result["projects"]["mr"]["destinations"] == ["local"]
    files = {slug: sorted((out / slug).rglob("*.dcm")) for slug in ("mr", "everything")}
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files["mr"] + files["everything"]}
    assert not (out / "ct").exists() and not (out / "few").exists()
    source = pydicom.dcmread(next(study.glob("*.dcm")))
    mr = pydicom.dcmread(files["mr"][0])
    assert mr.PatientID == Deidentifier(Profile.load("basic"), SECRETS["MR_SECRET"].encode(), "mr") \
        .patient_pseudonym(source.PatientID)
    assert mr.PatientID != pydicom.dcmread(files["everything"][0]).PatientID
    assert files["mr"][0].relative_to(out / "mr").parts[0] == mr.StudyInstanceUID != source.StudyInstanceUID
    # recorded: one row per project, the pseudonymised study, the original UID nowhere in clear
    row = records.find("mr", mr.StudyInstanceUID)
    assert row["status"] == "done" and row["instances"] == COUNT and row["destinations"] == ["local"]
    assert row["patientId"] == mr.PatientID and row["studyDate"] == (mr.get("StudyDate") or None)
    assert records.find("everything", pydicom.dcmread(files["everything"][0]).StudyInstanceUID)["status"] == "done"
    assert records.studies("ct") == records.studies("few") == []
    dump = _dump(records.engine.url.render_as_string(hide_password=False))
    assert source.StudyInstanceUID not in dump and str(source.PatientID) not in dump
    # sent again: not exported twice (files untouched, nothing new recorded)
    again = worker(**kwargs)
    assert again["projects"]["mr"]["status"] == again["projects"]["everything"]["status"] == "already-exported"
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files["mr"] + files["everything"]} == before
    assert records.find("mr", mr.StudyInstanceUID)["attempts"] == 1
    assert len(records.history(row["id"])) == 1
    assert not list(out.rglob("*.part"))
    records.dispose()


def test_a_failed_destination_is_recorded_retryable_and_its_working_folder_removed(projects, study, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("MR_SECRET", SECRETS["MR_SECRET"])
    (projects / "pacs.yaml").write_text(pacs_project("no-such-pacs", "DFTEST_NO_PACS2", "MR_SECRET"))
    config = extracts_config(projects, tmp_path)
    kwargs = dict(jobName="deid", headers=headers_of(next(study.glob("*.dcm"))), params={},
                  added_params={"deid": {"projects": ["pacs"]}}, dcmpath=str(study), event={}, config=config)
    with pytest.raises(Exception, match="pacs: .*no-such-pacs"):
        worker(**kwargs)
    records = open_records(f"sqlite:///{tmp_path / 'home' / 'exports.db'}")
    [row] = records.studies("pacs")
    assert row["status"] == "failed" and "no-such-pacs" in row["reason"]
    assert not (tmp_path / "extracts" / "pacs").exists()                      # not a local export
    assert not any((tmp_path / "home" / "extracts-work").iterdir())          # the working folder is gone
    with pytest.raises(Exception, match="no-such-pacs"):                      # a retried job tries it again
        worker(**kwargs)
    assert records.find("pacs", row["studyId"])["attempts"] == 2
    records.dispose()


def test_the_destinations_get_the_jobs_configuration_not_the_processs(projects, study, tmp_path, monkeypatch,
                                                                      connection):
    """DICOMFLOW_EXPORT_* of the job's `config` reach the send (the worker process's own say otherwise)."""
    monkeypatch.setenv("MR_SECRET", SECRETS["MR_SECRET"])
    monkeypatch.setenv("DICOMFLOW_CONFIG", "")
    monkeypatch.setenv("DICOMFLOW_EXPORT_ATTEMPTS", "3")          # the process's: must not be read
    monkeypatch.setenv("CLOSED_PACS_URL", f"http://127.0.0.1:{free_port()}/dicom-web")   # nothing listens
    (projects / "pacs.yaml").write_text(pacs_project("closed-pacs", "CLOSED_PACS", "MR_SECRET"))
    config = extracts_config(projects, tmp_path, DICOMFLOW_EXPORT_ATTEMPTS="1", DICOMFLOW_EXPORT_RETRY_BASE="0")
    kwargs = dict(jobName="deid", headers=headers_of(next(study.glob("*.dcm"))), params={},
                  added_params={"deid": {"projects": ["pacs"]}}, dcmpath=str(study), event={}, connection=connection)
    with pytest.raises(Exception, match="closed-pacs: STOW-RS failed 1 times"):
        worker(**kwargs, config=config)
    # a malformed value in the job's configuration fails the job naming the key, before any claim
    records = open_records(f"sqlite:///{tmp_path / 'home' / 'exports.db'}")
    [row] = records.studies("pacs")
    with pytest.raises(ConfigError, match="DICOMFLOW_EXPORT_ATTEMPTS"):
        worker(**kwargs, config={**config, "DICOMFLOW_EXPORT_ATTEMPTS": "many"})
    assert records.find("pacs", row["studyId"])["attempts"] == 1
    records.dispose()


def test_a_project_without_its_secret_fails_the_job_after_the_others(projects, study, tmp_path, monkeypatch):
    monkeypatch.setenv("ALL_SECRET", SECRETS["ALL_SECRET"])
    monkeypatch.delenv("MR_SECRET", raising=False)
    out = tmp_path / "extracts"
    with pytest.raises(Exception, match="mr: .*MR_SECRET is not set"):
        worker(jobName="deid", headers={}, params={}, added_params={"deid": {"projects": ["everything", "mr"]}},
               dcmpath=str(study), event={}, config=extracts_config(projects, tmp_path))
    assert len(list((out / "everything").rglob("*.dcm"))) == COUNT


def test_the_service_is_off_until_configured(projects):
    registry, importer = load_registry(REPO / "services" / "registry", ("high", "default", "low"), {})
    importer.retire()
    assert registry.errors == [], [str(p) for p in registry.errors]
    assert registry.inactive["deid"] == "waiting for configuration: DICOMFLOW_PROJECTS_DIR"


def _deid_jobs(connection, study_uid: str) -> list:
    """The deid jobs of a study's events, once every one of them has finished (or failed); [] before.

    A push's jobs (one per project: `fanOut`) are enqueued in one atomic write, so none is missing.
    """
    from rq.job import Job

    from dicomflow import keys

    jobs = [Job.fetch(j.decode(), connection=connection) for j in connection.smembers(keys.study_jobs(study_uid))]
    jobs = [j for j in jobs if j.id.startswith("deid-")]
    return jobs if all(j.get_status() in ("finished", "failed") for j in jobs) else []


def _pushes(jobs: list) -> list[dict[str, str]]:
    """Per push of the study (in order), each project's outcome, from its own job: exactly one
    job per project the callback named, each given only that project."""
    pushes: dict[str, dict[str, str]] = {}
    for job in sorted(jobs, key=lambda j: j.enqueued_at):
        [(slug, outcome)] = job.return_value()["projects"].items()
        assert job.kwargs["added_params"]["deid"]["projects"] == [slug]
        run = pushes.setdefault(job.id.rsplit("-", 1)[0], {})   # deid-<event>-<batch>-<item>
        assert slug not in run, f"{slug} had two jobs in one push"
        run[slug] = outcome["status"]
    return list(pushes.values())


def test_a_study_is_exported_once_per_project_through_the_pipeline(tmp_path, redis_url, connection, projects,
                                                                    study):
    out = tmp_path / "extracts"
    config = {"DICOMFLOW_PROJECTS_DIR": str(projects), "DICOMFLOW_EXTRACTS_DIR": str(out), **SECRETS}
    (projects / "everything.yaml").write_text("slug: everything\nstudies: {callingAeTitles: [MODALITY, AGAIN]}\n"
                                              "secret: {env: ALL_SECRET}\n")
    source = pydicom.dcmread(next(study.glob("*.dcm")))
    outside = get_testdata_file("rtdose.dcm")            # RTDOSE from OTHER: in no project
    outside_uid = str(pydicom.dcmread(outside, stop_before_pixels=True).StudyInstanceUID)
    with Pipeline(tmp_path / "stack", redis_url, REPO / "services", stable_age=2, extra_config=config) as stack:
        records = open_records(f"sqlite:///{tmp_path / 'stack' / 'home' / 'exports.db'}")

        def recorded(slug: str) -> list[dict]:
            return [r for r in records.studies(slug) if r["status"] == "done"]

        stack.orthanc.store([study], aet="MODALITY", pattern="*.dcm")
        stack.orthanc.store([outside], aet="OTHER")
        try:
            wait_for(lambda: len(recorded("mr")) == len(recorded("everything")) == 1, timeout=120,
                     what="the study recorded as exported for mr and everything")
            wait_for(lambda: _deid_jobs(connection, outside_uid), timeout=60,
                     what="the outside study's deid jobs to finish")
            wait_for(lambda: _deid_jobs(connection, source.StudyInstanceUID), timeout=60,
                     what="the study's deid jobs to finish")
            pushed = len(_deid_jobs(connection, source.StudyInstanceUID))
            # sent again (a new push): its jobs run and find the study exported for both projects
            mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")}
            stack.orthanc.store([study], aet="AGAIN", pattern="*.dcm")
            wait_for(lambda: len(_deid_jobs(connection, source.StudyInstanceUID)) == 2 * pushed, timeout=120,
                     what="the second push's deid jobs to finish")
        except TimeoutError as exc:
            raise AssertionError(diagnostics(stack)) from exc
    jobs = _deid_jobs(connection, source.StudyInstanceUID)
    first, second = _pushes(jobs)
    # one job per candidate project (those whose modality the worker checks included), no more
    assert set(first) == set(second) and {"mr", "everything"} <= set(first) and not {"scanner", "broken"} & set(first)
    assert {s: first[s] for s in ("mr", "everything")} == {"mr": "done", "everything": "done"}
    assert {s: second[s] for s in ("mr", "everything")} == {"mr": "already-exported", "everything": "already-exported"}
    assert {first[s] for s in set(first) - {"mr", "everything"}} <= {"not-selected", "empty"}
    first_job = min(jobs, key=lambda j: j.enqueued_at)
    # the broken project is reported (the callback's problems) and the others kept working
    assert any("broken.yaml [secret]" in p for p in first_job.kwargs["added_params"]["deid"]["problems"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.dcm")} == mtimes     # nothing written again
    assert sorted(p.name for p in out.iterdir()) == ["everything", "mr"]     # not ct, scanner, few, broken
    for slug in ("mr", "everything"):
        secret = SECRETS["MR_SECRET" if slug == "mr" else "ALL_SECRET"].encode()
        deid = Deidentifier(Profile.load("basic"), secret, slug)
        outputs = [pydicom.dcmread(p) for p in (out / slug).rglob("*.dcm")]
        assert len(outputs) == COUNT
        assert {d.PatientID for d in outputs} == {deid.patient_pseudonym(source.PatientID)}
        assert {d.StudyInstanceUID for d in outputs} == {deid.uid(source.StudyInstanceUID)}
        assert {d.SeriesInstanceUID for d in outputs} == {deid.uid(source.SeriesInstanceUID)}
        [row] = records.studies(slug)
        assert row["studyId"] == deid.uid(source.StudyInstanceUID) and row["attempts"] == 1
        assert row["instances"] == COUNT
    # the outside study: its job ran, and it went nowhere (no files, no record)
    [outside] = _pushes(_deid_jobs(connection, outside_uid))
    assert outside and set(outside.values()) <= {"not-selected", "empty"}
    assert all(len(records.studies(s)) == (1 if s in ("mr", "everything") else 0)
               for s in ("mr", "everything", "ct", "scanner", "few"))
    records.dispose()


def test_the_destinations_answers_make_done_partial_or_failed():
    from dicomflow.extracts.status import ExportStatus

    outcome = load_package(DEID_MODULE, "deid_module_outcome")._outcome
    ok = {"sent": 4, "failed": {}}
    assert outcome({"pacs": ok, "ftps": ok}, 4) == (ExportStatus.DONE, 4, {}, None)
    status, instances, failed, reason = outcome({"pacs": {"sent": 3, "failed": {"a/1.dcm": "409 Conflict"}}}, 4)
    assert (status, instances, failed, reason) == (ExportStatus.PARTIAL, 3, {"pacs:a/1.dcm": "409 Conflict"}, None)
    status, instances, _, reason = outcome({"pacs": ok, "ftps": {"sent": 0, "failed": {}, "error": "login refused"}}, 4)
    assert status is ExportStatus.PARTIAL and instances == 0 and reason == "ftps: login refused"
    status, _, _, reason = outcome({"pacs": {"sent": 0, "failed": {}, "error": "unreachable"}}, 4)
    assert status is ExportStatus.FAILED and reason == "pacs: unreachable"
    status, _, _, reason = outcome({"pacs": {"sent": 2, "failed": {}}}, 4)     # confirmed fewer, naming none
    assert status is ExportStatus.PARTIAL and reason == "pacs: 2 of 4 confirmed"
