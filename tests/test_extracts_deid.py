"""De-identification (issue 19): tag by tag on sag-anon and pydicom's test files."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomflow.extracts.deid import DICOM_UID_ROOT, Deidentifier, Profile
from dicomflow.extracts.errors import ProfileError
from dicomflow.extracts.project import load_project
from tests.conftest import REPO

SECRET = b"project-secret-0123456789"
PYDICOM_FILES = Path(pydicom.__file__).parent / "data"


def walk(ds: Dataset):
    """Every element of `ds`, in sequences too."""
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from walk(item)


def values(elem) -> set[str]:
    if elem.VR == "SQ" or elem.value is None or elem.value == "":
        return set()
    if isinstance(elem.value, (bytes, bytearray)):
        return set()
    if isinstance(elem.value, (list, pydicom.multival.MultiValue)):
        return {str(v) for v in elem.value if str(v)}
    return {str(elem.value)}


def identifying(ds: Dataset, profile: Profile) -> set[tuple[int, str]]:
    """(tag, value) of every element the profile does not keep, and every non-standard UID."""
    found = set()
    for elem in walk(ds):
        rule = profile.rule_for(elem.tag)
        if elem.tag.is_private or (rule is not None and rule.action not in ("K", "keep")):
            found |= {(int(elem.tag), v) for v in values(elem)}
        if elem.VR == "UI":
            found |= {(int(elem.tag), v) for v in values(elem) if not v.startswith(DICOM_UID_ROOT)}
    return found


def deidentify_folder(files, target: Path, deid: Deidentifier) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    return [deid.file(f, target / f.name) for f in files]


@pytest.fixture(scope="module")
def basic() -> Profile:
    return Profile.load("basic")


@pytest.fixture(scope="module")
def sag_files(sag_anon) -> list[Path]:
    return sorted(sag_anon.glob("*.dcm"))[:24]


def test_sag_anon_nothing_identifying_is_left(sag_files, basic, tmp_path):
    deid = Deidentifier(basic, SECRET, "alpha")
    outputs = deidentify_folder(sag_files, tmp_path, deid)
    for source, output in zip(sag_files, outputs):
        before = pydicom.dcmread(source)
        after = pydicom.dcmread(output)            # valid DICOM: reads back without force
        left = identifying(before, basic) & {(int(e.tag), v) for e in walk(after) for v in values(e)}
        assert not left, f"{source.name}: original values left: {left}"
        assert not [e for e in walk(after) if e.tag.is_private]
        assert after.PixelData == before.PixelData
        assert after.SOPClassUID == before.SOPClassUID
        assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
        assert after.file_meta.MediaStorageSOPInstanceUID == after.SOPInstanceUID
        assert after.PatientIdentityRemoved == "YES"
        assert after.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        # tag by tag: what goes, what changes, what stays
        assert after.PatientID == after.PatientName == deid.patient_pseudonym(before.PatientID)
        assert after.StudyDate == "" and after.get("InstitutionName", "") in ("", "ANONYMOUS")
        assert "ReferringPhysicianName" not in before or after.ReferringPhysicianName == ""
        assert "SeriesDescription" not in after                  # X in the basic profile
        assert after.Modality == before.Modality and after.SeriesNumber == before.SeriesNumber
        assert after.Rows == before.Rows and after.ImagePositionPatient == before.ImagePositionPatient
        assert before.preamble is None or after.preamble == b"\0" * 128


def test_uids_group_as_before_and_are_valid(sag_files, basic, tmp_path):
    deid = Deidentifier(basic, SECRET, "alpha")
    outs = [pydicom.dcmread(p) for p in deidentify_folder(sag_files, tmp_path, deid)]
    ins = [pydicom.dcmread(p) for p in sag_files]
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert len({str(d.get(keyword)) for d in outs}) == len({str(d.get(keyword)) for d in ins})
    assert len({d.SOPInstanceUID for d in outs}) == len(outs)
    for d, src in zip(outs, ins):
        assert d.StudyInstanceUID == deid.uid(src.StudyInstanceUID)
        for elem in walk(d):
            if elem.VR == "UI":
                for uid in values(elem):
                    assert UID(uid).is_valid, (elem, uid)
                    assert uid.startswith((DICOM_UID_ROOT, "2.25.")), (elem, uid)


def test_two_projects_differ_and_one_project_is_stable_across_processes(sag_files, basic, tmp_path):
    sample = sag_files[:3]
    one = deidentify_folder(sample, tmp_path / "a1", Deidentifier(basic, SECRET, "alpha"))
    other = deidentify_folder(sample, tmp_path / "b", Deidentifier(basic, SECRET, "beta"))
    keyed = deidentify_folder(sample, tmp_path / "a-key", Deidentifier(basic, SECRET + b"!", "alpha"))
    # the same project again, in another process (another hash seed, another interpreter)
    script = (
        "import sys; from pathlib import Path; from dicomflow.extracts.deid import Deidentifier, Profile\n"
        "d = Deidentifier(Profile.load('basic'), sys.argv[1].encode(), 'alpha')\n"
        "[d.file(Path(f), Path(sys.argv[2]) / Path(f).name) for f in sys.argv[3:]]\n"
    )
    (tmp_path / "a2").mkdir()
    subprocess.run([sys.executable, "-c", script, SECRET.decode(), str(tmp_path / "a2"), *map(str, sample)],
                   check=True, cwd=REPO, env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    for a1, b, k in zip(one, other, keyed):
        assert a1.read_bytes() == (tmp_path / "a2" / a1.name).read_bytes()
        d1, d2, d3 = pydicom.dcmread(a1), pydicom.dcmread(b), pydicom.dcmread(k)
        assert d1.PatientID != d2.PatientID != d3.PatientID != d1.PatientID
        assert d1.StudyInstanceUID != d2.StudyInstanceUID != d3.StudyInstanceUID
        assert d1.SOPInstanceUID != d2.SOPInstanceUID


def test_date_shift_is_per_patient(sag_files, tmp_path):
    deid = Deidentifier(Profile.load("basic-dateshift"), SECRET, "alpha")
    before = pydicom.dcmread(sag_files[0])
    after = pydicom.dcmread(deid.file(sag_files[0], tmp_path / "x.dcm"))
    offset = deid.date_offset(before.PatientID)
    assert -365 <= offset.days <= -1
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        if before.get(keyword):
            shifted = dt.datetime.strptime(before.get(keyword), "%Y%m%d").date() + offset
            assert after.get(keyword) == shifted.strftime("%Y%m%d"), keyword
    assert after.StudyTime == before.StudyTime               # whole days: times unchanged
    assert after.get("PatientBirthDate", "") == ""           # not a "modified dates" attribute: emptied
    assert after.LongitudinalTemporalInformationModified == "MODIFIED"
    other = Deidentifier(Profile.load("basic-dateshift"), SECRET, "alpha")
    assert other.date_offset("someone else") != offset or other.date_offset("x") != offset


def test_project_overrides(sag_files, tmp_path):
    folder = tmp_path / "projects"
    folder.mkdir()
    (folder / "p.key").write_text(SECRET.decode())
    before = pydicom.dcmread(sag_files[0])
    private = next(e.tag for e in before if e.tag.is_private and e.tag.element >= 0x1000)
    (folder / "p.yaml").write_text(
        "slug: p\nstudies: {all: true}\nsecret: {file: p.key}\n"
        "deid:\n  dateShift: true\n"
        f"  keepPrivate: ['{int(private):08x}']\n"
        "  overrides:\n"
        "    SeriesDescription: keep\n    Modality: remove\n    InstitutionName: {replace: HOSPITAL}\n"
        "    StationName: hash\n    PatientAge: keep\n    StudyID: empty\n")
    deid = Deidentifier.for_project(load_project(folder / "p.yaml"))
    after = pydicom.dcmread(deid.file(sag_files[0], tmp_path / "x.dcm"))
    assert after.SeriesDescription == before.SeriesDescription and "Modality" not in after
    assert after.InstitutionName == "HOSPITAL"
    assert after.StationName == deid.pseudonym("00081010", before.StationName, 16) != before.StationName
    assert after.PatientAge == before.PatientAge
    assert after.StudyID == ""
    assert after[private].value == before[private].value
    creator = (private.group << 16) | (private.element >> 8)
    assert after[creator].value == before[creator].value
    assert [e.tag for e in after if e.tag.is_private] == [creator, private]
    assert after.StudyDate != before.StudyDate and after.StudyDate


def test_broken_profiles_are_refused(tmp_path):
    with pytest.raises(ProfileError, match="no profile 'nope'"):
        Profile.load("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: basic\nrules: {PatientNmae: keep}\n")
    with pytest.raises(ProfileError, match="PatientNmae"):
        Profile.load(bad)
    bad.write_text("extends: basic\nrules: {PatientName: scramble}\n")
    with pytest.raises(ProfileError, match="unknown action 'scramble'"):
        Profile.load(bad)
    bad.write_text("extends: bad.yaml\n")
    with pytest.raises(ProfileError, match="extends itself"):
        Profile.load(bad)
    with pytest.raises(ProfileError, match="not a private tag"):
        Profile.load("basic").with_changes(keep_private=["00100010"])


def test_the_profile_covers_annex_e():
    """The data file is the standard's table: spot checks against PS3.15 Table E.1-1."""
    profile = Profile.load("annex_e_basic")
    expected = {"PatientName": "Z", "PatientID": "Z/D", "PatientBirthDate": "Z", "StudyInstanceUID": "U",
                "SOPInstanceUID": "U", "AccessionNumber": "Z", "InstitutionName": "X/Z/D",
                "StudyDate": "Z", "ReferringPhysicianName": "Z", "DeviceSerialNumber": "X/Z/D",
                "OperatorsName": "X/Z/D", "PatientAddress": "X", "ContentDate": "Z/D"}
    from pydicom.datadict import tag_for_keyword
    assert {k: profile.rules[tag_for_keyword(k)].action for k in expected} == expected
    assert len(profile.rules) + len(profile.masks) == 620 and len(profile.modified_dates) == 165


def _pydicom_test_files() -> list[Path]:
    """pydicom's own test files that pydicom itself reads and writes back (the others test its errors)."""
    files = []
    for path in sorted([*(PYDICOM_FILES / "test_files").rglob("*"), *(PYDICOM_FILES / "charset_files").rglob("*")]):
        if not path.is_file() or path.suffix in (".py", ".txt", ".json", ".gz", ".bz2", ".xml") \
                or path.stat().st_size > 4_000_000 or "DICOMDIR" in path.name:
            continue
        try:
            ds = pydicom.dcmread(path)
            if not len(ds):
                continue
            ds.save_as(Path("/dev/null"))
        except Exception:  # noqa: BLE001 - a file pydicom cannot round-trip is not a de-identification case
            continue
        files.append(path)
    return files


PYDICOM_CASES = _pydicom_test_files()


@pytest.mark.parametrize("path", PYDICOM_CASES, ids=[str(p.relative_to(PYDICOM_FILES)) for p in PYDICOM_CASES])
def test_pydicom_test_files(path, basic, tmp_path):
    """Sequences, private tags, odd character sets, compressed pixel data, big endian..."""
    deid = Deidentifier(basic, SECRET, "alpha")
    before = pydicom.dcmread(path)
    out = deid.file(path, tmp_path / "out.dcm")
    after = pydicom.dcmread(out)
    left = identifying(before, basic) & {(int(e.tag), v) for e in walk(after) for v in values(e)}
    assert not left, f"original values left: {left}"
    assert not [e for e in walk(after) if e.tag.is_private]
    if before.get("PatientID"):
        assert after.PatientID == after.PatientName == deid.patient_pseudonym(before.PatientID)
    assert after.get("SOPClassUID") == before.get("SOPClassUID")
    assert after.get("SpecificCharacterSet") == before.get("SpecificCharacterSet")
    if "PixelData" in before:
        assert after.PixelData == before.PixelData
    assert deid.file(path, tmp_path / "again.dcm").read_bytes() == out.read_bytes()


def test_there_are_enough_pydicom_cases():
    names = {p.name for p in PYDICOM_CASES}
    assert len(PYDICOM_CASES) >= 40
    assert {"chrH31.dcm", "chrX1.dcm", "nested_priv_SQ.dcm", "rtplan.dcm", "MR_small.dcm"} <= names
