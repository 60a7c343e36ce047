"""End to end (issue 20): a study sent to the pipeline's Orthanc is de-identified by the deid service
and sent to both kinds of destination — STOW-RS to a second Orthanc (Debian's DICOMweb plugin) and
a zip over FTPS (pyftpdlib, TLS) — and recorded as exported only once both confirmed every file;
what arrives is byte for byte what the de-identification engine makes of the study. Then the
project's Parquet extract goes to the same FTPS server, in PIXL's layout."""

from __future__ import annotations

import io
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest

from dicomflow.config import settings_from_config
from dicomflow.extracts.deid import Deidentifier
from dicomflow.extracts.parquet import write_extract
from dicomflow.extracts.project import ExtractSettings, load_project
from dicomflow.extracts.records import open_records
from tests.conftest import REPO
from tests.support.exports import SECRET_ENV
from tests.support.ftps import FtpsServer, make_certificates
from tests.support.orthanc import OrthancServer, stop_all
from tests.support.procs import wait_for
from tests.support.stack import Pipeline, diagnostics

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
COUNT = 8
SECRET = "e2e-export-secret-0123456789abcdef"


@pytest.fixture()
def pacs(tmp_path) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path / "research-pacs", plugin=False, extra={
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}})
    server.start()
    yield server
    stop_all([server])


@pytest.fixture()
def ftps(tmp_path) -> Iterator[tuple[FtpsServer, Path]]:
    ca, server_pem = make_certificates(tmp_path / "certs")
    server = FtpsServer(tmp_path / "ftp-root", server_pem).start()
    yield server, ca
    server.stop()


def test_a_study_sent_to_orthanc_arrives_de_identified_at_both_destinations(tmp_path, redis_url, connection,
                                                                          sag_anon, pacs, ftps):
    ftp, ca = ftps
    projects = tmp_path / "projects"
    (projects / "secrets").mkdir(parents=True)
    (projects / "secrets" / "ftps.env").write_text(f"URL={ftp.url}\nUSERNAME={ftp.username}\n"
                                                   f"PASSWORD={ftp.password}\n")
    (projects / "e2e.yaml").write_text(f"""\
slug: e2e
studies: {{modalities: [MR]}}
destinations:
  dicom: [research-pacs, research-ftps]
  parquet: [local, research-ftps]
  endpoints:
    research-pacs: {{type: dicomweb, secrets: {{envPrefix: E2E_PACS}}, rate: 50, maxBatchInstances: 3}}
    research-ftps: {{type: ftps, secrets: {{file: secrets/ftps.env}}, caFile: {ca}, rate: 50}}
secret: {{env: {SECRET_ENV}}}
""")
    study = tmp_path / "study"
    study.mkdir()
    sources = sorted(sag_anon.glob("*.dcm"))[:COUNT]
    for source in sources:
        shutil.copy(source, study / source.name)
    config = {"DICOMFLOW_PROJECTS_DIR": str(projects), SECRET_ENV: SECRET,
              "E2E_PACS_URL": pacs.url + "/dicom-web", "E2E_PACS_USERNAME": pacs.username,
              "E2E_PACS_PASSWORD": pacs.password}
    with Pipeline(tmp_path / "stack", redis_url, REPO / "services", stable_age=2, extra_config=config) as stack:
        records = open_records(f"sqlite:///{tmp_path / 'stack' / 'home' / 'exports.db'}")
        stack.orthanc.store([study], aet="MODALITY", pattern="*.dcm")
        try:
            wait_for(lambda: [r for r in records.studies("e2e") if r["status"] in ("done", "failed", "partial")],
                     timeout=120, what="the study's export recorded")
        except TimeoutError as exc:
            raise AssertionError(diagnostics(stack)) from exc
        [row] = records.studies("e2e")
        # then the project's Parquet extract (dicomflow-export parquet), uploaded to the same FTPS server
        project = load_project(projects / "e2e.yaml")
        extract = write_extract(project, records, settings_from_config(ExtractSettings, stack.env, "extracts"),
                                config=stack.env, connection=connection)
        records.dispose()
    assert row["status"] == "done", row
    assert row["instances"] == COUNT
    # what the engine makes of the study, here, is what the worker made and sent (same bytes)
    deid = Deidentifier.for_project(project, environ={SECRET_ENV: SECRET})
    expected: dict[str, bytes] = {}
    for source in sources:
        ds = deid.dataset(pydicom.dcmread(source))
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        expected[f"{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"] = buffer.getvalue()
    study_id = deid.uid(str(pydicom.dcmread(sources[0], stop_before_pixels=True).StudyInstanceUID))
    assert row["studyId"] == study_id
    # DICOMweb: every instance, byte for byte
    arrived = {}
    for instance in pacs.get("/instances"):
        tags = pacs.get(f"/instances/{instance}/simplified-tags")
        arrived[f"{tags['SeriesInstanceUID']}/{tags['SOPInstanceUID']}.dcm"] = pacs.session.get(
            f"{pacs.url}/instances/{instance}/file", timeout=30).content
    assert arrived == expected
    # FTPS: one zip per study and the Parquet extract, in PIXL's layout
    files = ftp.files()
    parquet = f"e2e/{extract.path.name}/parquet/radiology/radiology.parquet"
    assert set(files) == {parquet, f"e2e/{study_id}.zip"}
    with zipfile.ZipFile(io.BytesIO(files[f"e2e/{study_id}.zip"])) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == expected
    assert files[parquet] == (extract.path / "radiology" / "radiology.parquet").read_bytes()
    assert extract.destinations["research-ftps"] == {"sent": 1, "failed": {}}
    assert pq.read_table(io.BytesIO(files[parquet])).num_rows >= 1


def _deid_worker():
    import importlib.util
    import sys

    name = "deid_module_under_export_test"
    spec = importlib.util.spec_from_file_location(name, REPO / "services" / "modules" / "deid" / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.worker


def test_an_instance_the_destination_drops_makes_the_export_partial_and_the_retry_completes_it(
        tmp_path, connection, sag_anon, monkeypatch):
    """The deid worker against a DICOMweb Orthanc whose filter drops the 3rd instance it receives, once:
    the export is recorded partial naming that file (nothing recorded as sent that the server does
    not hold), the job fails so it is retried, and the retry sends the study again and records it done."""
    lua = tmp_path / "drop-third.lua"
    lua.write_text("received = 0\nfunction ReceivedInstanceFilter(dicom, origin, info)\n"
                   "  received = received + 1\n  return received ~= 3\nend\n")
    server = OrthancServer(tmp_path / "research-pacs", plugin=False, extra={
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "LuaScripts": [str(lua)]})
    server.start()
    try:
        projects = tmp_path / "projects"
        projects.mkdir()
        (projects / "p.yaml").write_text(f"slug: p\nstudies: {{all: true}}\nsecret: {{env: {SECRET_ENV}}}\n"
                                         "destinations:\n  dicom: [pacs]\n  endpoints:\n"
                                         "    pacs: {type: dicomweb, secrets: {envPrefix: DFTEST_DROP_PACS}, rate: 0,"
                                         " maxBatchInstances: 4}\n")
        for key, value in {SECRET_ENV: SECRET, "DFTEST_DROP_PACS_URL": server.url + "/dicom-web",
                           "DFTEST_DROP_PACS_USERNAME": server.username,
                           "DFTEST_DROP_PACS_PASSWORD": server.password}.items():
            monkeypatch.setenv(key, value)
        study = tmp_path / "study"
        study.mkdir()
        for source in sorted(sag_anon.glob("*.dcm"))[:COUNT]:
            shutil.copy(source, study / source.name)
        config = {"DICOMFLOW_PROJECTS_DIR": str(projects), "DICOMFLOW_HOME": str(tmp_path / "home"),
                  "DICOMFLOW_EXPORT_ATTEMPTS": "1"}
        kwargs = dict(jobName="deid", headers={}, params={}, added_params={"deid": {"projects": ["p"]}},
                      dcmpath=str(study), event={}, config=config, connection=connection)
        worker = _deid_worker()
        with pytest.raises(Exception, match=r"p: partial: \{'pacs:.*does not hold it"):
            worker(**kwargs)
        records = open_records(f"sqlite:///{tmp_path / 'home' / 'exports.db'}")
        [row] = records.studies("p")
        assert row["status"] == "partial" and row["instances"] == COUNT - 1
        [(name, reason)] = row["failedFiles"].items()
        assert name.startswith("pacs:") and name.endswith(".dcm") and "does not hold it" in reason
        assert len(server.get("/instances")) == COUNT - 1
        assert not any((tmp_path / "home" / "extracts-work").iterdir())   # made again from the source
        result = worker(**kwargs)                                           # RQ's retry of the job
        assert result["projects"]["p"]["status"] == "done"
        row = records.find("p", row["studyId"])
        assert row["status"] == "done" and row["instances"] == COUNT and row["failedFiles"] == {}
        assert len(server.get("/instances")) == COUNT
        records.dispose()
    finally:
        stop_all([server])
