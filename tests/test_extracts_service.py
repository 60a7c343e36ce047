"""The deid service (issue 19): a study push de-identified once per project it belongs to."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pydicom
import pytest

from dicomflow.extracts.deid import Deidentifier, Profile
from scheduler.registry import load_registry
from tests.conftest import REPO
from tests.support.procs import wait_for
from tests.support.stack import Pipeline, diagnostics

SECRETS = {"MR_SECRET": "mr-project-secret-0123456789", "ALL_SECRET": "all-project-secret-0123456789"}
COUNT = 12


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


callback = _load(REPO / "services" / "registry" / "deid", "deid_registry_under_test").callback
worker = _load(REPO / "services" / "modules" / "deid", "deid_module_under_test").worker


@pytest.fixture()
def study(sag_anon, tmp_path) -> Path:
    """COUNT instances of sag-anon (one MR series), as Orthanc would hand them to a study job."""
    folder = tmp_path / "study"
    folder.mkdir()
    for source in sorted(sag_anon.glob("*.dcm"))[:COUNT]:
        shutil.copy(source, folder / source.name)
    return folder


@pytest.fixture()
def projects(tmp_path) -> Path:
    folder = tmp_path / "projects"
    folder.mkdir()
    (folder / "mr.yaml").write_text("slug: mr\nstudies: {modalities: [MR]}\nsecret: {env: MR_SECRET}\n"
                                    "series: {dropDescriptions: [localizer]}\n")
    (folder / "everything.yaml").write_text("slug: everything\nstudies: {all: true}\nsecret: {env: ALL_SECRET}\n")
    (folder / "ct.yaml").write_text("slug: ct\nstudies: {modalities: [CT]}\nsecret: {env: MR_SECRET}\n")
    (folder / "scanner.yaml").write_text("slug: scanner\nstudies: {callingAeTitles: [CT_SCANNER]}\n"
                                         "secret: {env: MR_SECRET}\n")
    (folder / "few.yaml").write_text("slug: few\nstudies: {all: true}\nseries: {minInstances: 1000}\n"
                                     "secret: {env: MR_SECRET}\n")
    (folder / "broken.yaml").write_text("slug: broken\nstudies: {all: true}\nsecret: inline-secret\n")
    return folder


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


def test_worker_writes_each_project_and_is_idempotent(projects, study, tmp_path, monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "extracts"
    config = {"DICOMFLOW_PROJECTS_DIR": str(projects), "DICOMFLOW_EXTRACTS_DIR": str(out)}
    kwargs = dict(jobName="deid", headers=headers_of(next(study.glob("*.dcm"))), params={},
                  added_params={"deid": {"projects": ["ct", "everything", "few", "mr", "gone"]}},
                  dcmpath=str(study), event={"remoteAet": "MODALITY"}, config=config)
    result = worker(**kwargs)
    assert result["projects"]["ct"]["status"] == "not-selected"
    assert result["projects"]["gone"]["status"] == "gone"
    assert result["projects"]["few"] == {"status": "done", "written": 0, "droppedSeries": [
        {"series": result["projects"]["few"]["droppedSeries"][0]["series"], "instances": COUNT}]}
    assert result["projects"]["mr"]["written"] == result["projects"]["everything"]["written"] == COUNT
    files = {slug: sorted((out / slug).rglob("*.dcm")) for slug in ("mr", "everything")}
    before = {p: p.read_bytes() for p in files["mr"] + files["everything"]}
    assert not (out / "ct").exists() and not (out / "few").exists()
    source = pydicom.dcmread(next(study.glob("*.dcm")))
    mr = pydicom.dcmread(files["mr"][0])
    assert mr.PatientID == Deidentifier(Profile.load("basic"), SECRETS["MR_SECRET"].encode(), "mr") \
        .patient_pseudonym(source.PatientID)
    assert mr.PatientID != pydicom.dcmread(files["everything"][0]).PatientID
    assert files["mr"][0].relative_to(out / "mr").parts[0] == mr.StudyInstanceUID != source.StudyInstanceUID
    worker(**kwargs)                                      # at least once: a re-run writes the same bytes
    assert {p: p.read_bytes() for p in sorted((out / "mr").rglob("*.dcm")) + files["everything"]} == before
    assert not list(out.rglob("*.part"))


def test_a_project_without_its_secret_fails_the_job_after_the_others(projects, study, tmp_path, monkeypatch):
    monkeypatch.setenv("ALL_SECRET", SECRETS["ALL_SECRET"])
    monkeypatch.delenv("MR_SECRET", raising=False)
    out = tmp_path / "extracts"
    with pytest.raises(Exception, match="mr: .*MR_SECRET is not set"):
        worker(jobName="deid", headers={}, params={}, added_params={"deid": {"projects": ["everything", "mr"]}},
               dcmpath=str(study), event={}, config={"DICOMFLOW_PROJECTS_DIR": str(projects),
                                                     "DICOMFLOW_EXTRACTS_DIR": str(out)})
    assert len(list((out / "everything").rglob("*.dcm"))) == COUNT


def test_the_service_is_off_until_configured(projects):
    registry, importer = load_registry(REPO / "services" / "registry", ("high", "default", "low"), {})
    importer.retire()
    assert registry.errors == [], [str(p) for p in registry.errors]
    assert registry.inactive["deid"] == "waiting for configuration: DICOMFLOW_PROJECTS_DIR"


def test_a_study_is_deidentified_once_per_project_through_the_pipeline(tmp_path, redis_url, connection,
                                                                        projects, study):
    out = tmp_path / "extracts"
    config = {"DICOMFLOW_PROJECTS_DIR": str(projects), "DICOMFLOW_EXTRACTS_DIR": str(out), **SECRETS}
    with Pipeline(tmp_path / "stack", redis_url, REPO / "services", stable_age=2, extra_config=config) as stack:
        stack.orthanc.store([study], aet="MODALITY", pattern="*.dcm")
        try:
            wait_for(lambda: all(len(list((out / s).rglob("*.dcm"))) == COUNT for s in ("mr", "everything")),
                     timeout=120, what=f"{COUNT} de-identified files per project")
        except TimeoutError as exc:
            raise AssertionError(diagnostics(stack)) from exc
    assert sorted(p.name for p in out.iterdir()) == ["everything", "mr"]     # not ct, scanner, few, broken
    source = pydicom.dcmread(next(study.glob("*.dcm")))
    for slug in ("mr", "everything"):
        secret = SECRETS["MR_SECRET" if slug == "mr" else "ALL_SECRET"].encode()
        deid = Deidentifier(Profile.load("basic"), secret, slug)
        outputs = [pydicom.dcmread(p) for p in (out / slug).rglob("*.dcm")]
        assert {d.PatientID for d in outputs} == {deid.patient_pseudonym(source.PatientID)}
        assert {d.StudyInstanceUID for d in outputs} == {deid.uid(source.StudyInstanceUID)}
        assert {d.SeriesInstanceUID for d in outputs} == {deid.uid(source.SeriesInstanceUID)}
