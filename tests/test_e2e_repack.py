"""The built-in repack service through the whole pipeline, with the real services folder."""

from __future__ import annotations

import json

import pydicom

from scheduler.registry import load_registry
from tests.conftest import REPO, SAG_ANON_COUNT
from tests.support.procs import wait_for
from tests.support.stack import Pipeline, diagnostics

SERIES_DIR = ("1449c1d-anonymized-20090701/MR-Brain_w_o_Contrast-98edede8b2-20130308/"
              "00005-SAG_MPRAGE_220_FOV-a27cf06")


def test_builtin_repack_is_off_until_configured():
    registry, importer = load_registry(REPO / "services" / "registry", ("high", "default", "low"), {})
    importer.retire()
    assert registry.errors == [], [str(p) for p in registry.errors]
    assert registry.inactive["repack"] == "waiting for configuration: REPACK_DATADIR"
    registry, importer = load_registry(REPO / "services" / "registry", ("high", "default", "low"),
                                       {"REPACK_DATADIR": "/data"})
    importer.retire()
    assert "repack" in registry.jobs


def test_sag_anon_is_repacked_through_the_pipeline(tmp_path, redis_url, connection, sag_anon):
    data, logs = tmp_path / "pypx-data", tmp_path / "pypx-log"
    config = {"REPACK_DATADIR": str(data), "REPACK_LOGDIR": str(logs)}
    with Pipeline(tmp_path / "stack", redis_url, REPO / "services", extra_config=config) as stack:
        stack.orthanc.store([sag_anon], aet="OXITESTORTHANC", pattern="*.dcm")
        series = data / SERIES_DIR
        try:
            wait_for(lambda: series.is_dir() and len(list(series.glob("*.dcm"))) == SAG_ANON_COUNT, timeout=120,
                     what=f"{SAG_ANON_COUNT} repacked files")
        except TimeoutError as exc:
            raise AssertionError(diagnostics(stack)) from exc
    for source in sag_anon.glob("*.dcm"):
        target = series / source.name  # sag-anon's names are already NNNN-<SOPInstanceUID>.dcm
        # Orthanc rewrites the file meta group (its own implementation UID, the sender's
        # AE title); the dataset itself must arrive unchanged.
        assert pydicom.dcmread(target) == pydicom.dcmread(source)
    sop = str(pydicom.dcmread(next(sag_anon.glob("0001-*.dcm")), stop_before_pixels=True).SOPInstanceUID)
    assert (series / f"0001-{sop}.dcm").is_file()
    patient = json.loads((logs / "patientData" / "1449c1d.json").read_text())
    assert patient["1449c1d"]["StudyList"] == ["1.2.840.113845.11.1000000001785349915.20130308061609.6346698"]
