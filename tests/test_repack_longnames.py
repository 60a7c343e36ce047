"""Over-long names: a component over NAME_MAX (255 bytes) is shortened deterministically, not refused.

px-repack and rx-repack fail on such an instance with "File name too long" (errno
ENAMETOOLONG); see ``docs/repack.md`` for the rule.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dicomflow.repack.header import read_header
from dicomflow.repack.layout import FILE_NAME_MAX, NAME_MAX, fit_name, pack_path
from dicomflow.repack.repacker import repack_file
from tests.support.repack_dicom import make_instance

# pydicom warns when writing the over-long values these tests need.
pytestmark = pytest.mark.filterwarnings("ignore:The value length:UserWarning",
                                        "ignore:The PN component length:UserWarning",
                                        "ignore:Value .* is not valid:UserWarning")

LONG = "A" * 300
SERIES_UID = "1.2.826.0.1.9.2"


def test_a_name_that_fits_is_unchanged():
    assert fit_name("x" * NAME_MAX) == "x" * NAME_MAX
    assert fit_name("PID-Doe_Jane-19800102") == "PID-Doe_Jane-19800102"


def test_a_long_name_is_prefix_underscore_sha256_and_the_kept_ending():
    name = "B" * 400 + ".dcm"
    short = fit_name(name, keep=".dcm")
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    assert short == "B" * (NAME_MAX - 1 - 16 - 4) + "_" + digest + ".dcm"
    assert len(short.encode()) == NAME_MAX


def test_two_long_names_differing_only_at_the_end_get_different_names():
    a, b = fit_name("C" * 299 + "1"), fit_name("C" * 299 + "2")
    assert a != b and a[:200] == b[:200]
    assert len(a) == len(b) == NAME_MAX


def test_the_same_long_name_gives_the_same_result_in_another_process():
    # str hashing is salted per process (PYTHONHASHSEED): the rule must not depend on it.
    code = ("from dicomflow.repack.layout import fit_name; "
            "print(fit_name('D' * 300 + '-abc1234', keep='-abc1234'))")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert runs == {fit_name("D" * 300 + "-abc1234", keep="-abc1234")}


def test_a_cut_never_splits_a_utf8_character():
    short = fit_name("é" * 200, limit=NAME_MAX)  # 400 bytes
    assert len(short.encode()) <= NAME_MAX
    short.encode().decode("utf-8")  # whole characters only
    assert short.startswith("é" * 100)


def pack_path_of(path: Path):
    return pack_path(read_header(str(path)))


@pytest.mark.parametrize("keyword", ["PatientName", "StudyDescription", "SeriesDescription"])
def test_an_instance_with_a_300_character_value_is_repacked(tmp_path, keyword):
    src = make_instance(tmp_path / "in.dcm", series_uid=SERIES_UID, **{keyword: LONG})
    result = repack_file(str(src), str(tmp_path / "data"), str(tmp_path / "log"))
    dst = Path(result.dst)
    assert dst.read_bytes() == src.read_bytes()
    parts = dst.relative_to(tmp_path / "data").parts
    assert all(len(p.encode()) <= NAME_MAX for p in parts)
    long_part = next(p for p in parts if "AAAA" in p)
    assert len(long_part) == NAME_MAX
    # The instance's log file is named after the file and exists.
    img = json.loads((tmp_path / "log" / "seriesData" / f"{SERIES_UID}-img" / f"{dst.name}.json").read_text())
    assert img[SERIES_UID]["imageObj"] == {dst.name: {"FSlocation": str(dst)}}


def test_the_series_folder_keeps_its_hash7_and_the_file_its_extension(tmp_path):
    src = make_instance(tmp_path / "in.dcm", series_uid=SERIES_UID, SeriesDescription=LONG,
                        InstanceNumber="9" * 300)
    place = pack_path_of(src)
    plain = pack_path_of(make_instance(tmp_path / "plain.dcm", series_uid=SERIES_UID))
    assert place.series.startswith("00003-AAAA") and place.series.endswith(plain.series[-8:])
    assert place.filename.startswith("9999") and place.filename.endswith(".dcm")
    assert len(place.filename) == FILE_NAME_MAX  # room for "{file name}.json" in the logs


def test_two_long_descriptions_differing_only_at_the_end_get_two_folders(tmp_path):
    data = tmp_path / "data"
    dsts = []
    for i, last in enumerate("XY"):
        src = make_instance(tmp_path / f"{i}.dcm", PatientID="P1", study_uid="1.2.9.1", series_uid=f"1.2.9.1.{i}",
                            StudyDescription=f"{LONG}{last}", SeriesDescription="T1")
        dsts.append(Path(repack_file(str(src), str(data)).dst))
    assert dsts[0].parent.parent != dsts[1].parent.parent
    assert dsts[0].parent.parent.parent == dsts[1].parent.parent.parent  # same patient folder
    # Repacking the same file again lands on the same name (a re-run, another worker).
    again = make_instance(tmp_path / "again.dcm", PatientID="P1", study_uid="1.2.9.1", series_uid="1.2.9.1.0",
                          StudyDescription=f"{LONG}X", SeriesDescription="T1")
    assert Path(repack_file(str(again), str(data)).dst).parent.parent == dsts[0].parent.parent


def test_over_long_ids_shorten_the_log_file_names_too(tmp_path):
    long_id = "P" * 300
    study, series = "1." + "2" * 298, "1." + "3" * 298  # not valid UIDs, but seen in the wild
    src = make_instance(tmp_path / "in.dcm", PatientID=long_id, study_uid=study, series_uid=series)
    result = repack_file(str(src), str(tmp_path / "data"), str(tmp_path / "log"))
    log = tmp_path / "log"
    names = [p.name for p in log.rglob("*")]
    assert all(len(n.encode()) <= NAME_MAX for n in names)
    patient = log / "patientData" / fit_name(f"{long_id}.json", keep=".json")
    assert json.loads(patient.read_text())[long_id]["StudyList"] == [study]
    assert (log / "studyData" / fit_name(f"{study}-series", keep="-series")
            / fit_name(f"{series}-meta.json", keep="-meta.json")).is_file()
    assert (log / "studyData" / fit_name(f"{study}-meta.json", keep="-meta.json")).is_file()
    series_data = log / "seriesData"
    assert (series_data / fit_name(f"{series}-meta.json", keep="-meta.json")).is_file()
    assert (series_data / fit_name(f"{series}-pack.json", keep="-pack.json")).is_file()
    assert (series_data / fit_name(f"{series}-img", keep="-img") / f"{Path(result.dst).name}.json").is_file()
    assert not list(tmp_path.rglob("*.tmp"))
