"""Storage path rules of cube.md section 1 and the registration metadata of section 2."""

from __future__ import annotations

import pytest

from dicomflow.chris.errors import InvalidTagError
from dicomflow.chris.instance import read_instance_tags
from dicomflow.chris.metadata import age_in_days, normalise_date, patient_sex, registration_fields
from dicomflow.chris.paths import instance_path
from dicomflow.errors import MissingTagError
from tests.support.chris_env import AET, SAG_FOLDER

BASE = {
    "PatientID": "1449c1d", "PatientName": "anonymized", "PatientBirthDate": "20090701",
    "StudyDescription": "MR-Brain w/o Contrast", "AccessionNumber": "98edede8b2", "StudyDate": "20130308",
    "SeriesNumber": "5", "SeriesDescription": "SAG MPRAGE 220 FOV", "InstanceNumber": "1",
    "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.3.12.2.1107.5.2.19.45152.2013030808061520200285270.0.0.0",
    "SOPInstanceUID": "1.2.3.4.5",
}


def path_of(**changes: object) -> str:
    tags = {**BASE, **changes}
    return instance_path({k: v for k, v in tags.items() if v is not None}, AET).path


def test_every_sag_anon_file_lands_at_its_cube_md_path(sag_anon, sag_anon_count):
    files = sorted(sag_anon.glob("*.dcm"))
    assert len(files) == sag_anon_count in (16, 192)  # the shipped first 16, or the whole series in CI
    paths = [instance_path(read_instance_tags(f), AET).path for f in files]
    # The files of sag-anon are named as cube.md says they are stored: NNNN-<SOPInstanceUID>.dcm.
    assert paths == [f"{SAG_FOLDER}/{f.name}" for f in files]
    assert paths[0] == (f"{SAG_FOLDER}/0001-1.3.12.2.1107.5.2.19.45152.2013030808110258929186035.dcm")
    assert {p.rsplit("/", 1)[1][:4] for p in paths} == {f"{n:04d}" for n in range(1, sag_anon_count + 1)}


def test_worked_example_of_a_single_file():
    assert path_of() == ("SERVICES/PACS/OXITESTORTHANC/1449c1d-anonymized-20090701/MR-Brain_w_o_Contrast-"
                         "98edede8b2-20130308/00005-SAG_MPRAGE_220_FOV-a27cf06/0001-1.2.3.4.5.dcm")


def test_nul_bytes_and_surrounding_whitespace_are_dropped():
    assert "/ab_c-" in path_of(PatientID="\x00ab c\x00 ")
    assert "/0007-" in path_of(InstanceNumber=" 7\x00")


def test_a_run_of_bad_characters_becomes_one_underscore():
    assert "/A_B.c-d_e-" in path_of(PatientID="A/ ?B.c-d**é ,e")
    assert path_of(StudyDescription="MR-Brain w/o Contrast").count("MR-Brain_w_o_Contrast") == 1
    assert "/x_y-" in path_of(PatientID="x @#$%^&*()y")


def test_multi_valued_tags_count_as_missing():
    assert "/00005-SeriesDescription-a27cf06/" in path_of(SeriesDescription="A\\B")
    assert "/StudyDescription-" in path_of(StudyDescription=["A", "B"])
    assert "/1449c1d--20090701/" in path_of(PatientName="A\\B")
    with pytest.raises(MissingTagError) as err:
        path_of(PatientID="ID1\\ID2")
    assert err.value.keyword == "PatientID"


def test_empty_accession_number_becomes_its_name_and_empty_patient_name_empty():
    assert "/MR-Brain_w_o_Contrast-AccessionNumber-20130308/" in path_of(AccessionNumber="")
    assert "/MR-Brain_w_o_Contrast-AccessionNumber-20130308/" in path_of(AccessionNumber=None)
    assert "/1449c1d--/" in path_of(PatientName=" ", PatientBirthDate=None)


def test_series_and_instance_numbers():
    assert "/00005-" in path_of(SeriesNumber="05")
    assert "/00012-" in path_of(SeriesNumber="12")
    assert "/123456-" in path_of(SeriesNumber="123456")
    assert "/00x12-" in path_of(SeriesNumber="x12")  # not a number: raw string, padded
    assert "/SeriesNumber-SAG" in path_of(SeriesNumber=None)
    assert "/InstanceNumber-1.2.3.4.5.dcm" in path_of(InstanceNumber="")
    assert "/0042-" in path_of(InstanceNumber="0042")
    assert "/00-1-" in path_of(InstanceNumber="-1")


def test_hash_is_not_zero_padded():
    import seahash
    # A UID whose SeaHash has fewer than 16 hex digits: the 7 characters start with its first digit.
    uid = next(f"1.2.{n}" for n in range(100000) if len(format(seahash.hash(f"1.2.{n}".encode()), "x")) < 16)
    digits = format(seahash.hash(uid.encode()), "x")
    assert f"-{digits[:7]}/" in path_of(SeriesInstanceUID=uid)
    assert f"-{digits.zfill(16)[:7]}/" not in path_of(SeriesInstanceUID=uid)
    assert "-a27cf06/" in path_of()


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                     "PatientID", "StudyDate"])
def test_required_tags_name_themselves(keyword):
    with pytest.raises(MissingTagError, match=keyword) as err:
        path_of(**{keyword: None})
    assert err.value.keyword == keyword
    with pytest.raises(MissingTagError, match=keyword):
        path_of(**{keyword: "  \x00"})


def test_pacs_name_is_sanitised_in_the_path():
    assert instance_path(BASE, "MY PACS").path.startswith("SERVICES/PACS/MY_PACS/")


def test_path_never_leaves_its_folder():
    assert "/_.._..-SAG" in path_of(SeriesNumber="/../..")
    assert "/_.._-1.2.3.4.5.dcm" in path_of(InstanceNumber="/../")


@pytest.mark.parametrize("value, days", [("003Y", 1096), ("001Y", 365), ("002Y", 730), ("010D", 10),
                                         ("005W", 35), ("012M", 365), ("001M", 30), ("006M", 183),
                                         ("000D", 0), (" 003Y\x00", 1096)])
def test_patient_age_in_days_rounded_half_away_from_zero(value, days):
    assert age_in_days(value) == days


@pytest.mark.parametrize("value", [None, "", "3 years", "Y", "003X", "1\\2"])
def test_unparsable_patient_age_is_omitted(value):
    assert age_in_days(value) is None


def test_rounding_is_half_away_from_zero():
    from dicomflow.chris.metadata import round_half_away
    assert [round_half_away(v) for v in (0.5, 1.5, 2.5, -0.5, -2.5, 2.4999)] == [1, 2, 3, -1, -3, 2]


def test_patient_sex_and_dates():
    assert [patient_sex(v) for v in ("M", "f", " O ", "U", "", None, "MALE")] == ["M", "F", "O", None, None,
                                                                                   None, None]
    assert normalise_date("20130308") == "2013-03-08"
    assert normalise_date("2013.03.08") == "2013-03-08"
    assert normalise_date("2013-03-08") == "2013-03-08"
    assert [normalise_date(v) for v in ("", "2013/03/08", "20131308", None)] == [None] * 4


def test_registration_fields_omit_missing_optional_fields():
    tags = {k: v for k, v in BASE.items() if k not in ("PatientName", "PatientBirthDate")}
    tags.update(PatientSex="U", PatientAge="old", PatientBirthDate="")
    fields = registration_fields(tags, AET)
    for absent in ("PatientName", "PatientBirthDate", "PatientSex", "PatientAge", "Modality", "ProtocolName"):
        assert absent not in fields
    assert fields["StudyDate"] == "2013-03-08"
    assert None not in fields.values() and "" not in fields.values()


def test_registration_fields_limits():
    fields = registration_fields({**BASE, "Modality": "M" * 40, "StudyDescription": "d" * 500}, AET)
    assert len(fields["Modality"]) == 15 and len(fields["StudyDescription"]) == 400
    with pytest.raises(InvalidTagError, match="PatientID"):
        registration_fields({**BASE, "PatientID": "p" * 101}, AET)
    with pytest.raises(InvalidTagError, match="StudyDate"):
        registration_fields({**BASE, "StudyDate": "2013/03/08"}, AET)
    with pytest.raises(InvalidTagError, match="pacs_name"):
        registration_fields(BASE, "A" * 21)


def test_sag_series_body_equals_cube_md_worked_example(sag_anon):
    first = min(sag_anon.glob("*.dcm"))
    fields = registration_fields(read_instance_tags(first), AET)
    fields.update(path=SAG_FOLDER, ndicom=192)
    assert fields == {
        "pacs_name": "OXITESTORTHANC", "PatientID": "1449c1d", "StudyDate": "2013-03-08",
        "PatientName": "anonymized", "PatientBirthDate": "20090701", "PatientAge": 1096, "PatientSex": "M",
        "AccessionNumber": "98edede8b2", "Modality": "MR", "ProtocolName": "SAG MPRAGE 220 FOV",
        "StudyDescription": "MR-Brain w/o Contrast", "SeriesDescription": "SAG MPRAGE 220 FOV",
        "StudyInstanceUID": "1.2.840.113845.11.1000000001785349915.20130308061609.6346698",
        "SeriesInstanceUID": "1.3.12.2.1107.5.2.19.45152.2013030808061520200285270.0.0.0",
        "ndicom": 192, "path": SAG_FOLDER,
    }


def _derived(tags: dict) -> dict:
    """What the ChRIS service makes of a file's tags: its storage path and registration body,
    or the error it fails the instance with."""
    try:
        location = instance_path(tags, AET)
        return {"path": location.path, "fields": registration_fields(tags, location.pacs_name)}
    except (MissingTagError, InvalidTagError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _pydicom_files() -> list:
    from pathlib import Path

    from pydicom.data import get_charset_files, get_testdata_files
    return sorted(Path(p) for p in get_testdata_files() + get_charset_files() if Path(p).is_file())


def test_the_fast_header_reader_makes_the_same_paths_and_registrations_as_pydicom(sag_anon):
    """The standard-library reader (the hot path) against pydicom's, on sag-anon and on every file
    pydicom ships (other syntaxes, character sets, odd values): the same storage path and the
    same registration body, or the same error, for every file pydicom reads (a header the strict
    reader refuses goes to pydicom: SC_rgb_jpeg.dcm's Implicit VR data set labelled Explicit)."""
    from dicomflow.chris.errors import StorageWriteError
    from dicomflow.chris.instance import read_instance_tags_pydicom

    compared = 0
    for path in sorted(sag_anon.glob("*.dcm"))[:20] + _pydicom_files():
        try:
            expected = _derived(read_instance_tags_pydicom(path))
        except StorageWriteError:
            with pytest.raises(StorageWriteError):       # not DICOM for pydicom: not for us either
                read_instance_tags(path)
            continue
        assert _derived(read_instance_tags(path)) == expected, path.name
        compared += 1
    assert compared > 100


def test_a_person_name_reads_the_same_whatever_the_reader(sag_anon, tmp_path):
    """Empty trailing component groups go, as pydicom reads them: the storage path does not
    depend on which reader read the file."""
    import pydicom

    from dicomflow.chris.instance import read_instance_tags_pydicom

    from pydicom.dataelem import RawDataElement

    ds = pydicom.dcmread(sorted(sag_anon.glob("*.dcm"))[0])
    raw = b"Yamada^Tarou=\x20\x20"[:14]        # as written by a modality: an empty ideographic group
    ds._dict[0x00100010] = RawDataElement(pydicom.tag.Tag(0x00100010), "PN", len(raw), raw, 0, False, True)
    path = tmp_path / "pn.dcm"
    ds.save_as(path)
    fast, slow = read_instance_tags(path), read_instance_tags_pydicom(path)
    assert fast["PatientName"] == "Yamada^Tarou" and _derived(fast) == _derived(slow)


def test_a_corrupted_tag_number_sends_the_file_to_pydicom(sag_anon, tmp_path):
    """The fast reader stops at the first tag past the last it wants; a corrupted group number
    that looks like one must not make it drop the tags after it (PatientID, the UIDs...)."""
    from dicomflow.chris.instance import read_instance_tags_pydicom

    data = sorted(sag_anon.glob("*.dcm"))[0].read_bytes()
    study_date = b"\x08\x00\x20\x00DA"               # (0008,0020) StudyDate, Explicit VR LE
    assert data.count(study_date) == 1
    path = tmp_path / "corrupt.dcm"
    path.write_bytes(data.replace(study_date, b"\x99\x00\x20\x00DA"))   # now (0099,0020)
    tags = read_instance_tags(path)
    assert {"PatientID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber"} <= set(tags)
    assert _derived(tags) == _derived(read_instance_tags_pydicom(path))


@pytest.mark.parametrize("cut", [0, 10, 131, 140, 300, 700, 1200])
def test_a_broken_file_is_a_storage_error_naming_it(sag_anon, tmp_path, cut):
    """Not DICOM, or cut off inside its header: a StorageWriteError naming the file (the instance
    fails, its series records why), never another exception that would fail the whole batch."""
    from dicomflow.chris.errors import StorageWriteError

    path = tmp_path / "broken.dcm"
    path.write_bytes(sorted(sag_anon.glob("*.dcm"))[0].read_bytes()[:cut])
    try:
        tags = read_instance_tags(path)
    except StorageWriteError as exc:
        assert str(path) in str(exc)
    else:   # pydicom reads what there is: then a required tag is missing, and says so
        with pytest.raises((MissingTagError, InvalidTagError)):
            instance_path(tags, AET)


def test_what_pydicom_cannot_read_either_is_a_storage_error(sag_anon, tmp_path):
    """A file the fast reader hands to pydicom (no InstanceNumber) with a VR pydicom does not
    know: pydicom's NotImplementedError becomes the StorageWriteError that fails that instance."""
    import pydicom

    from dicomflow.chris.errors import StorageWriteError

    ds = pydicom.dcmread(sorted(sag_anon.glob("*.dcm"))[0])
    del ds.InstanceNumber
    path = tmp_path / "odd-vr.dcm"
    ds.save_as(path)
    path.write_bytes(path.read_bytes().replace(b"\x08\x00\x20\x00DA", b"\x08\x00\x20\x00ZZ"))
    with pytest.raises(StorageWriteError, match="NotImplementedError.*ZZ"):
        read_instance_tags(path)
