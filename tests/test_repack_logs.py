"""The six kinds of pypx log JSON the repack writes, and the result it reports."""

from __future__ import annotations

import json
from pathlib import Path

from dicomflow.repack.repacker import repack_file
from tests.support.repack_dicom import make_instance

STUDY, SERIES, SOP = "1.2.826.0.1.1", "1.2.826.0.1.1.2", "1.2.826.0.1.1.2.3"


def load(path: Path):
    text = path.read_text()
    assert text.startswith("{\n    \""), f"{path} is not pretty-printed with 4 spaces"
    return json.loads(text)


def test_all_six_log_files_of_one_instance(tmp_path):
    src = make_instance(tmp_path / "in" / "x.dcm", study_uid=STUDY, series_uid=SERIES, sop_uid=SOP,
                        PatientID="PAT1", SeriesNumber="03", InstanceNumber="7")
    result = repack_file(str(src), str(tmp_path / "data"), str(tmp_path / "log"))
    log = tmp_path / "log"
    name = f"0007-{SOP}.dcm"
    series_dir = tmp_path / "data" / "PAT1-Doe_Jane-19800102" / "Brain_MRI-ACC123-20240301" / "00003-T1_AX-"
    series_dirs = list(series_dir.parent.iterdir())
    assert len(series_dirs) == 1 and series_dirs[0].name.startswith("00003-T1_AX-")
    dst = series_dirs[0] / name
    assert result.dst == str(dst) and dst.read_bytes() == src.read_bytes()

    assert load(log / "patientData" / "PAT1.json") == {"PAT1": {
        "PatientID": "PAT1", "PatientName": "Doe^Jane", "PatientAge": "044Y", "PatientSex": "F",
        "PatientBirthDate": "19800102", "StudyList": [STUDY]}}

    series_meta = load(log / "studyData" / f"{STUDY}-series" / f"{SERIES}-meta.json")
    assert list(series_meta) == [STUDY]
    entry = series_meta[STUDY]
    assert set(entry) == {"SeriesInstanceUID", "SeriesBaseDir", "DICOM"}
    assert entry["SeriesInstanceUID"] == SERIES and entry["SeriesBaseDir"] == str(series_dirs[0])
    assert entry["DICOM"]["PatientName"] == {"value": "Doe^Jane", "label": "PatientName"}
    assert entry["DICOM"]["SeriesNumber"] == {"value": "03", "label": "SeriesNumber"}  # as written
    assert "PixelData" not in entry["DICOM"] and "ReferencedStudySequence" in entry["DICOM"]
    assert all(v["label"] == k and isinstance(v["value"], str) for k, v in entry["DICOM"].items())

    assert load(log / "studyData" / f"{STUDY}-meta.json") == {STUDY: {
        "PatientID": "PAT1", "StudyDescription": "Brain MRI", "StudyDate": "20240301",
        "StudyInstanceUID": STUDY, "PerformedStationAETitle": "SCANNER1"}}

    series_fields = {"PatientID": "PAT1", "StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES,
                     "SeriesDescription": "T1 AX", "SeriesNumber": "03", "SeriesDate": "20240301",
                     "Modality": "MR"}
    assert load(log / "seriesData" / f"{SERIES}-meta.json") == {SERIES: series_fields}
    assert load(log / "seriesData" / f"{SERIES}-img" / f"{name}.json") == {SERIES: {
        **series_fields, "outputFile": name, "imageObj": {name: {"FSlocation": str(dst)}}}}
    assert json.loads((log / "seriesData" / f"{SERIES}-pack.json").read_text()) == {"seriesPack": True}

    written = sorted(str(p.relative_to(log)) for p in log.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert written == sorted(["patientData/PAT1.json", f"studyData/{STUDY}-series/{SERIES}-meta.json",
                              f"studyData/{STUDY}-meta.json", f"seriesData/{SERIES}-meta.json",
                              f"seriesData/{SERIES}-img/{name}.json", f"seriesData/{SERIES}-pack.json"])
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_missing_values_are_not_defined_and_reported(tmp_path):
    src = make_instance(tmp_path / "x.dcm", study_uid=STUDY, series_uid=SERIES, PatientID="PAT2",
                        PatientName=None, PatientSex="", PatientAge="044Y\\045Y", Modality=None,
                        PerformedStationAETitle=None, SeriesDescription=None)
    result = repack_file(str(src), str(tmp_path / "data"), str(tmp_path / "log"))
    log = tmp_path / "log"
    patient = load(log / "patientData" / "PAT2.json")["PAT2"]
    assert (patient["PatientName"], patient["PatientSex"], patient["PatientAge"]) == ("Not defined",) * 3
    assert load(log / "studyData" / f"{STUDY}-meta.json")[STUDY]["PerformedStationAETitle"] == "Not defined"
    series = load(log / "seriesData" / f"{SERIES}-meta.json")[SERIES]
    assert series["Modality"] == series["SeriesDescription"] == "Not defined"
    assert result.as_json()["missing"] == [
        {"tag": "(0010,0010)", "name": "PatientName", "error": "no such element"},
        {"tag": "(0008,103E)", "name": "SeriesDescription", "error": "no such element"},
        {"tag": "(0010,1010)", "name": "PatientAge", "error": "multiple values"},
        {"tag": "(0010,0040)", "name": "PatientSex", "error": "empty value"},
        {"tag": "(0040,0241)", "name": "PerformedStationAETitle", "error": "no such element"},
        {"tag": "(0008,0060)", "name": "Modality", "error": "no such element"},
    ]


def test_no_missing_key_when_nothing_is_missing_and_no_logs_without_logdir(tmp_path):
    src = make_instance(tmp_path / "x.dcm")
    result = repack_file(str(src), str(tmp_path / "data"))
    doc = result.as_json()
    assert set(doc) == {"src", "dst", "size", "PatientID", "SeriesInstanceUID"}
    assert doc["size"] == src.stat().st_size and doc["PatientID"] == "PAT001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "x.dcm"]


def test_study_list_grows_once_per_study_and_first_instance_fixes_the_patient(tmp_path):
    log = tmp_path / "log"
    for i, (study, name) in enumerate([("1.2.9.1", "First^Name"), ("1.2.9.2", "Other^Name"),
                                       ("1.2.9.1", "Third^Name"), ("1.2.9.3", "Fourth^Name")]):
        src = make_instance(tmp_path / f"{i}.dcm", study_uid=study, PatientID="P", PatientName=name)
        repack_file(str(src), str(tmp_path / "data"), str(log))
    assert load(log / "patientData" / "P.json") == {"P": {
        "PatientID": "P", "PatientName": "First^Name", "PatientAge": "044Y", "PatientSex": "F",
        "PatientBirthDate": "19800102", "StudyList": ["1.2.9.1", "1.2.9.2", "1.2.9.3"]}}


def test_write_once_files_keep_the_first_instance(tmp_path):
    log = tmp_path / "log"
    for i, desc in enumerate(["First", "Second"]):
        src = make_instance(tmp_path / f"{i}.dcm", study_uid=STUDY, series_uid=SERIES, StudyDescription=desc,
                            InstanceNumber=str(i + 1))
        repack_file(str(src), str(tmp_path / "data"), str(log))
    assert load(log / "studyData" / f"{STUDY}-meta.json")[STUDY]["StudyDescription"] == "First"
    assert len(list((log / "seriesData" / f"{SERIES}-img").glob("*.json"))) == 2


def test_sag_anon_patient_data_is_the_documented_one(sag_anon: Path, tmp_path):
    for src in sorted(sag_anon.glob("*.dcm"))[:3]:
        repack_file(str(src), str(tmp_path / "data"), str(tmp_path / "log"))
    assert load(tmp_path / "log" / "patientData" / "1449c1d.json") == {"1449c1d": {
        "PatientID": "1449c1d", "PatientName": "anonymized", "PatientAge": "003Y", "PatientSex": "M",
        "PatientBirthDate": "20090701",
        "StudyList": ["1.2.840.113845.11.1000000001785349915.20130308061609.6346698"]}}
