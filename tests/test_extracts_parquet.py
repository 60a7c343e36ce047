"""Parquet extracts (issue 19): PIXL's layout, radiology.parquet read back against the exported files."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest

from dicomflow.config import settings_from_config
from dicomflow.extracts.cli import main
from dicomflow.extracts.parquet import RADIOLOGY_SCHEMA, write_extract
from dicomflow.extracts.project import ExtractSettings, load_project
from dicomflow.extracts.records import open_records
from tests.support.extracts import DEID_MODULE, extracts_config, load_package, project_folder
from tests.support.services import AUTH

SECRET = "parquet-project-secret-0123456789"
COUNT = 5

worker = load_package(DEID_MODULE, "deid_module_under_parquet_test").worker


def _study(sag_anon: Path, folder: Path, n: int) -> Path:
    """COUNT sag-anon files as study n (its own patient, study, series and instance UIDs)."""
    folder.mkdir(parents=True)
    for i, source in enumerate(sorted(sag_anon.glob("*.dcm"))[:COUNT]):
        ds = pydicom.dcmread(source)
        if n:
            ds.PatientID = f"PATIENT-{n}"
            ds.StudyInstanceUID = f"1.2.826.0.1.3680043.10.999.{n}"
            ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.10.999.{n}.1"
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.999.{n}.1.{i}"
            ds.SeriesDescription = f"series of study {n}"
        ds.save_as(folder / f"{i}.dcm")
    return folder


@pytest.fixture()
def setup(tmp_path, sag_anon, monkeypatch):
    projects = project_folder(tmp_path, {"mr": (
        "slug: mr\nstudies: {modalities: [MR]}\nsecret: {env: PQ_SECRET}\nomopExtract: omop-extract\n"
        "deid: {dateShift: true, overrides: {SeriesDescription: keep}}\n"
        "destinations: {parquet: [local]}\n")})
    omop = projects / "omop-extract"
    (omop / "public").mkdir(parents=True)
    (omop / "private").mkdir()
    pq.write_table(pa.table({"person_id": [1, 2]}), omop / "public" / "PERSON.parquet")
    pq.write_table(pa.table({"secret": ["x"]}), omop / "private" / "PERSON_LINKS.parquet")
    config = extracts_config(projects, tmp_path, DICOMFLOW_EXPORTS_DIR=str(tmp_path / "exports"), DICOMFLOW_CONFIG="")
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PQ_SECRET", SECRET)
    for n in range(2):
        folder = _study(sag_anon, tmp_path / f"study{n}", n)
        worker(jobName="deid", headers={}, params={}, added_params={"deid": {"projects": ["mr"]}},
               dcmpath=str(folder), event={}, config=config)
    return config


def test_the_extract_reads_back_as_what_was_exported(setup, tmp_path):
    settings = settings_from_config(ExtractSettings, setup, "extracts")
    records = open_records(settings.records_url)
    project = load_project(Path(setup["DICOMFLOW_PROJECTS_DIR"]) / "mr.yaml")
    when = dt.datetime(2026, 12, 2, 16, 55, 3, tzinfo=dt.UTC)
    result = write_extract(project, records, settings, now=when)
    base = tmp_path / "exports" / "mr"
    assert result.path == base / "all_extracts" / "2026-12-02t16-55-03" and result.studies == 2
    assert (base / "latest").resolve() == result.path and os.readlink(base / "latest") == \
        "all_extracts/2026-12-02t16-55-03"
    # omop/public is the cohort's public tables, byte for byte; private/ is not carried
    assert (result.path / "omop" / "public" / "PERSON.parquet").read_bytes() == \
        (tmp_path / "projects" / "omop-extract" / "public" / "PERSON.parquet").read_bytes()
    assert not (result.path / "omop" / "private").exists()
    table = pq.read_table(result.path / "radiology" / "radiology.parquet")
    assert table.schema.equals(RADIOLOGY_SCHEMA, check_metadata=False)
    rows = {r["study_instance_uid"]: r for r in table.to_pylist()}
    # against the exported files themselves
    exported = {}
    for path in (tmp_path / "extracts" / "mr").rglob("*.dcm"):
        exported.setdefault(path.relative_to(tmp_path / "extracts" / "mr").parts[0], []).append(pydicom.dcmread(path))
    assert set(rows) == set(exported) and len(rows) == 2
    originals = {str(pydicom.dcmread(next((tmp_path / f"study{n}").glob("*.dcm"))).StudyDate) for n in range(2)}
    for study_id, files in exported.items():
        row, first = rows[study_id], files[0]
        assert row["project"] == "mr" and row["extract_datetime"] == when
        assert row["patient_id"] == first.PatientID and row["accession_number"] == (first.AccessionNumber or None)
        assert row["study_date"] == dt.datetime.strptime(first.StudyDate, "%Y%m%d").date()
        assert first.StudyDate not in originals                       # shifted
        assert row["modalities"] == ["MR"] and row["instance_count"] == len(files) == COUNT
        assert row["series_descriptions"] == [first.SeriesDescription] and row["series_count"] == 1
        assert row["destinations"] == ["local"] and row["exported_at"] <= dt.datetime.now(dt.UTC)
    assert {r["patient_id"] for r in rows.values()} == {f.PatientID for fs in exported.values() for f in fs}
    # a second extract: latest switches to it, the first stays; both are recorded
    later = write_extract(project, records, settings, now=when + dt.timedelta(hours=1))
    assert (base / "latest").resolve() == later.path and result.path.is_dir()
    assert not [p for p in (base / "all_extracts").iterdir() if p.name.startswith(".")]
    assert not [p for p in base.iterdir() if p.name.startswith(".")]
    assert [e["path"] for e in records.extracts("mr")] == [str(later.path), str(result.path)]
    again = write_extract(project, records, settings, now=when + dt.timedelta(hours=1))   # same second
    assert again.path.name == later.path.name + "-2"
    records.dispose()


def test_a_broken_omop_extract_is_refused_and_leaves_nothing(setup, tmp_path):
    shutil.rmtree(tmp_path / "projects" / "omop-extract" / "public")
    settings = settings_from_config(ExtractSettings, setup, "extracts")
    records = open_records(settings.records_url)
    with pytest.raises(Exception, match=r"mr.yaml \[omopExtract\]: the OMOP extract has no public/ folder"):
        write_extract(load_project(Path(setup["DICOMFLOW_PROJECTS_DIR"]) / "mr.yaml"), records, settings)
    assert not (tmp_path / "exports" / "mr" / "latest").exists() and records.extracts("mr") == []
    records.dispose()


def test_the_command_and_the_api_write_an_extract(setup, tmp_path, capsys, make_client):
    assert main(["parquet", "mr"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["studies"] == 2 and Path(answer["path"], "radiology", "radiology.parquet").is_file()
    assert main(["parquet", "nope"]) == 1 and "cannot read" in capsys.readouterr().err
    client = make_client(**{k: v for k, v in setup.items() if k != "DICOMFLOW_CONFIG"})
    made = client.post("/api/v1/exports/mr/parquet", headers=AUTH)
    assert made.status_code == 201 and made.get_json()["studies"] == 2
    assert (tmp_path / "exports" / "mr" / "latest").resolve() == Path(made.get_json()["path"])
    assert client.post("/api/v1/exports/nope/parquet", headers=AUTH).status_code == 404
    assert client.get("/api/v1/exports/mr", headers=AUTH).get_json()["lastExtract"]["path"] == made.get_json()["path"]
