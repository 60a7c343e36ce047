"""`dicomflow-send` against a real Orthanc: folders with files that are not DICOM, refusals, exit codes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file

from dicomflow import send
from tests.support.orthanc import OrthancServer, write_series
from tests.support.procs import free_port

SEND = Path(sys.executable).parent / "dicomflow-send"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc without the plugin, checking the called AE title (so that a wrong one is rejected)."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"), plugin=False, extra={"DicomCheckCalledAet": True})
    server.start()
    yield server
    server.stop()


def _count(server: OrthancServer) -> int:
    return server.get("/statistics")["CountInstances"]


def _run(*args: str, env: dict | None = None, cwd: Path | None = None,
         unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    environ = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    return subprocess.run([str(SEND), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=environ)


def _folder(root: Path) -> tuple[Path, int]:
    """A series folder as users have them: DICOM of two SOP classes and two transfer syntaxes in a
    tree, a README.md, and a DICOM file cut off in its header. Returns (folder, DICOM files)."""
    folder = root / "series"
    write_series(folder, 3, modality="CT", patient_id="SEND01")
    write_series(folder / "mr", 2, modality="MR", patient_id="SEND01")
    shutil.copy(get_testdata_file("MR_small_implicit.dcm"), folder / "mr" / "implicit.dcm")
    (folder / "README.md").write_text("# a series\nnot DICOM\n")
    whole = (folder / "mr" / "implicit.dcm").read_bytes()
    (folder / "broken.dcm").write_bytes(whole[:200])  # preamble, DICM, part of the file meta
    return folder, 6


def test_a_folder_stores_the_dicom_lists_the_rest_and_fails_for_the_broken_file(orthanc, tmp_path):
    folder, dicom = _folder(tmp_path)
    before = _count(orthanc)
    done = _run("--port", str(orthanc.dicom_port), "--aec", orthanc.aet, "--aet", "MYMODALITY", str(folder))
    assert done.returncode == send.EXIT_FAILED, done.stderr
    assert _count(orthanc) - before == dicom
    assert f"skipped (not DICOM): {folder / 'README.md'}" in done.stderr
    assert f"failed: {folder / 'broken.dcm'}: unreadable" in done.stderr
    assert f"{dicom} stored, 1 failed, 1 skipped (not DICOM)" in done.stderr
    assert done.stdout == ""

    # Without the broken file: exit 0, the README.md still listed; the defaults from the configuration file.
    (folder / "broken.dcm").unlink()
    config = tmp_path / "dicomflow.env"
    config.write_text(f"ORTHANC_DICOM_PORT={orthanc.dicom_port}\nORTHANC_AET={orthanc.aet}\n")
    done = _run(str(folder), env={"DICOMFLOW_CONFIG": str(config)})
    assert done.returncode == send.EXIT_OK, done.stderr
    assert f"skipped (not DICOM): {folder / 'README.md'}" in done.stderr
    assert f"{dicom} stored, 0 failed, 1 skipped (not DICOM)" in done.stderr
    assert _calling_aets(orthanc, "SEND01") == {"MYMODALITY"}  # Orthanc keeps the first sender's


def _calling_aets(server: OrthancServer, patient_id: str) -> set[str]:
    found = server.post("/tools/find", {"Level": "Instance", "Query": {"PatientID": patient_id}})
    return {server.session.get(f"{server.url}/instances/{i}/metadata/RemoteAET", timeout=10).text for i in found}


def test_defaults_come_from_state_dicomflow_env_in_the_current_folder(orthanc, tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "dicomflow.env").write_text(
        f"ORTHANC_DICOM_PORT={orthanc.dicom_port}\nORTHANC_AET={orthanc.aet}\n")
    files = write_series(tmp_path / "in", 2, patient_id="SEND02")
    done = _run(*map(str, files), cwd=tmp_path,
                unset=("DICOMFLOW_CONFIG", "DICOMFLOW_HOME", "ORTHANC_DICOM_PORT", "ORTHANC_AET"))
    assert done.returncode == 0, done.stderr
    assert "2 stored, 0 failed, 0 skipped" in done.stderr
    assert _calling_aets(orthanc, "SEND02") == {send.DEFAULT_CALLING_AET}


def test_a_refusal_is_reported_with_its_dimse_status(tmp_path):
    """The plugin's disk guard refuses every C-STORE with 0xA700 (its free-space watermark is out of reach)."""
    server = OrthancServer(tmp_path / "orthanc", plugin=True, plugin_options={"MinFreeSpaceMB": 10**9})
    server.start()
    try:
        files = write_series(tmp_path / "in", 2, patient_id="SEND03")
        done = _run("--port", str(server.dicom_port), "--aec", server.aet, *map(str, files))
        assert done.returncode == send.EXIT_FAILED, done.stderr
        for path in files:
            assert f"failed: {path}: 0xA700 Refused: Out of Resources" in done.stderr
        assert "0 stored, 2 failed, 0 skipped" in done.stderr
        assert _count(server) == 0
    finally:
        server.stop()


def test_a_rejected_association_exits_3_with_the_reason(orthanc, tmp_path):
    files = write_series(tmp_path / "in", 1, patient_id="SEND04")
    done = _run("--port", str(orthanc.dicom_port), "--aec", "NOTORTHANC", str(files[0]))
    assert done.returncode == send.EXIT_NO_ASSOCIATION, done.stderr
    assert "rejected the association" in done.stderr and "Called AE title not recognised" in done.stderr
    assert "nothing sent" in done.stderr


def test_nobody_listening_exits_3(tmp_path):
    files = write_series(tmp_path / "in", 1, patient_id="SEND05")
    result = CliRunner().invoke(send.main, ["--port", str(free_port()), "--aec", "X", "--timeout", "5",
                                            "--no-progress", str(files[0])])
    assert result.exit_code == send.EXIT_NO_ASSOCIATION, result.output
    assert "no association with X@127.0.0.1" in result.output


def test_no_dicom_at_all_is_a_failure_and_usage_errors_exit_2(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    result = CliRunner().invoke(send.main, ["--port", "104", "--aec", "X", str(tmp_path)])
    assert result.exit_code == send.EXIT_FAILED
    assert "0 stored, 0 failed, 1 skipped" in result.output
    assert CliRunner().invoke(send.main, [str(tmp_path / "missing")]).exit_code == send.EXIT_USAGE
    assert CliRunner().invoke(send.main, ["--aet", "A" * 17, "--port", "104", "--aec", "X",
                                          str(tmp_path)]).exit_code == send.EXIT_USAGE


def test_help_documents_the_exit_codes():
    done = _run("--help")
    assert done.returncode == 0
    for code in (send.EXIT_OK, send.EXIT_FAILED, send.EXIT_USAGE, send.EXIT_NO_ASSOCIATION):
        assert re.search(rf"^ +{code}  \w", done.stdout, re.M), code
    for option in ("--host", "--port", "--aec", "--aet", "--config"):
        assert option in done.stdout
