"""Bad input to the repack: an error naming the file and the reason, exit 1, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dicomflow.errors import MissingTagError
from dicomflow.repack.errors import NotDicomError, UnreadableFileError, UnsafeValueError
from dicomflow.repack.repacker import repack_file
from tests.support.repack_dicom import make_instance


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomflow.repack", *args], capture_output=True, text=True,
                          timeout=60, check=False)


def written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _not_dicom(folder: Path) -> tuple[Path, str]:
    path = folder / "report.pdf"
    path.write_bytes(b"%PDF-1.4 " + b"x" * 500)
    return path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"


def _missing_series_uid(folder: Path) -> tuple[Path, str]:
    path = make_instance(folder / "nouid.dcm", drop=("SeriesInstanceUID",))
    return path, "required DICOM tag SeriesInstanceUID is missing or empty"


def _missing_patient_id(folder: Path) -> tuple[Path, str]:
    path = make_instance(folder / "nopid.dcm", PatientID=None)
    return path, "required DICOM tag PatientID is missing or empty"


def _truncated(folder: Path) -> tuple[Path, str]:
    path = make_instance(folder / "cut.dcm")
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"Doe^Jane") + 2])
    return path, "truncated"


def _absent(folder: Path) -> tuple[Path, str]:
    return folder / "never-received.dcm", "cannot read it: No such file or directory"


def _a_folder(folder: Path) -> tuple[Path, str]:
    path = folder / "folder.dcm"
    path.mkdir()
    return path, "cannot read it: Is a directory"


def _slash_in_patient_id(folder: Path) -> tuple[Path, str]:
    return make_instance(folder / "slash.dcm", PatientID="../../etc"), "PatientID '../../etc' cannot name a log file"


CASES = [_not_dicom, _missing_series_uid, _missing_patient_id, _truncated, _absent, _a_folder, _slash_in_patient_id]


@pytest.mark.parametrize("make", CASES, ids=lambda f: f.__name__.strip("_"))
def test_command_reports_file_and_reason_and_writes_nothing(tmp_path, make):
    inbox = tmp_path / "in"
    inbox.mkdir()
    src, reason = make(inbox)
    out = tmp_path / "out"
    done = run_cli("--xcrdir", str(inbox), "--xcrfile", src.name, "--datadir", str(out / "data"),
                   "--logdir", str(out / "log"), "--log-ndjson")
    assert done.returncode == 1
    line = json.loads(done.stdout)
    assert line["src"] == str(src) and line["dst"] is None
    assert str(src) in line["error"] and reason in line["error"]
    assert set(line) == {"src", "dst", "error"}
    assert str(src) in done.stderr and reason in done.stderr
    assert written(out) == []


@pytest.mark.parametrize(("make", "error"), [(_not_dicom, NotDicomError), (_missing_series_uid, MissingTagError),
                                             (_absent, UnreadableFileError), (_slash_in_patient_id, UnsafeValueError)])
def test_function_raises_a_specific_error(tmp_path, make, error):
    src, reason = make(tmp_path)
    with pytest.raises(error) as err:
        repack_file(str(src), str(tmp_path / "data"), str(tmp_path / "log"))
    assert str(src) in str(err.value) and reason in str(err.value)
    assert not (tmp_path / "data").exists() and not (tmp_path / "log").exists()


def test_an_unwritable_data_folder_is_an_error_naming_it(tmp_path):
    src = make_instance(tmp_path / "x.dcm")
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data folder should be")
    done = run_cli("--xcrdir", str(tmp_path), "--xcrfile", "x.dcm", "--datadir", str(blocker), "-l")
    assert done.returncode == 1
    assert str(blocker) in json.loads(done.stdout)["error"]
    assert src.exists()


def test_tree_mode_goes_on_after_a_bad_file_and_exits_1(tmp_path):
    inbox = tmp_path / "in"
    make_instance(inbox / "a" / "good1.dcm")
    _not_dicom(inbox)
    make_instance(inbox / "b" / "good2.dcm")
    done = run_cli("--xcrdir", str(inbox), "--datadir", str(tmp_path / "data"), "-l")
    assert done.returncode == 1
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["dst"] is None for line in lines] == [True, False, False]  # report.pdf, then a/, b/
    assert len(list((tmp_path / "data").rglob("*.dcm"))) == 2
