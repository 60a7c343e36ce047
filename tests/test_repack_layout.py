"""The pypx layout rules of the repack, and the fast header reader they rely on."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from dicomflow.errors import MissingTagError
from dicomflow.repack.errors import MalformedDicomError, NotDicomError, UnreadableFileError
from dicomflow.repack.header import TAGS, Header, read_header, read_header_fast, read_header_pydicom
from dicomflow.repack.layout import instance_number, pack_path, series_number
from tests.support.repack_dicom import make_instance

SAG_SERIES = "00005-SAG_MPRAGE_220_FOV-a27cf06"


def header(**values: str) -> Header:
    """A header with the required tags set, plus `values`."""
    base = {"SOPInstanceUID": "1.2.3.4", "PatientID": "PID", "StudyInstanceUID": "1.2.3",
            "SeriesInstanceUID": "1.3.12.2.1107.5.2.19.45152.2013030808061520200285270.0.0.0"}
    return Header("/src/x.dcm", {**base, **values}, "test")


def test_sag_anon_path_is_the_documented_one(sag_anon: Path):
    first = min(sag_anon.glob("0001-*.dcm"))
    place = pack_path(read_header(str(first)))
    assert place.relpath == ("1449c1d-anonymized-20090701/MR-Brain_w_o_Contrast-98edede8b2-20130308/"
                             f"{SAG_SERIES}/{first.name}")


def test_runs_of_unsafe_characters_become_one_underscore():
    place = pack_path(header(PatientName="O'Brien^^Mary  Ann", StudyDescription="CT  Head/Neck (w+w/o)",
                             AccessionNumber="A B", StudyDate="20240101"))
    assert place.patient == "PID-O_Brien_Mary_Ann-PatientBirthDate"
    assert place.study == "CT_Head_Neck_w_w_o_-A_B-20240101"


def test_nul_bytes_are_removed_not_replaced():
    place = pack_path(header(SeriesDescription="T1\x00AX\x00", SeriesNumber="2\x00", PatientName="A\x00B"))
    assert place.series.startswith("00002-T1AX-")
    assert place.patient.startswith("PID-AB-")


def test_dots_and_dashes_are_kept():
    assert pack_path(header(StudyDescription="v1.2-final")).study.startswith("v1.2-final-")


@pytest.mark.parametrize("value", [None, "", "   ", "\x00\x00", "A\\B"])
def test_missing_empty_or_multivalued_becomes_the_tag_name(value):
    values = {} if value is None else {k: value for k in ("PatientName", "PatientBirthDate", "StudyDescription",
                                                          "AccessionNumber", "StudyDate", "SeriesNumber",
                                                          "SeriesDescription", "InstanceNumber")}
    place = pack_path(header(**values))
    assert place.patient == "PID-PatientName-PatientBirthDate"
    assert place.study == "StudyDescription-AccessionNumber-StudyDate"
    assert place.series == "SeriesNumber-SeriesDescription-a27cf06"
    assert place.filename == "InstanceNumber-1.2.3.4.dcm"


@pytest.mark.parametrize(("raw", "padded"), [
    ("5", "00005"), ("05", "00005"), (" 7 ", "00007"), ("000012", "00012"), ("123456", "123456"),
    ("-3", "000-3"), ("abc", "00abc"), ("²", "0000²"),
])
def test_series_number_is_parsed_when_an_integer_then_padded_to_5(raw, padded):
    assert series_number(header(SeriesNumber=raw).get("SeriesNumber")) == padded


@pytest.mark.parametrize(("raw", "padded"), [
    ("1", "0001"), ("07", "0007"), ("00001", "00001"), ("12345", "12345"), (" 3 ", "0003"), ("x", "000x"),
])
def test_instance_number_is_the_raw_string_padded_to_4(raw, padded):
    assert instance_number(header(InstanceNumber=raw).get("InstanceNumber")) == padded


def test_series_folder_ends_with_hash7_of_the_series_uid():
    assert pack_path(header(SeriesNumber="5", SeriesDescription="SAG MPRAGE 220 FOV")).series == SAG_SERIES
    other = Header("/x", {**header().values, "SeriesInstanceUID": "1.2.3.999"}, "test")
    assert not pack_path(other).series.endswith("a27cf06")


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "PatientID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_a_missing_required_tag_is_an_error_naming_tag_and_file(keyword):
    values = header().values
    values[keyword] = " "
    with pytest.raises(MissingTagError) as err:
        pack_path(Header("/src/x.dcm", values, "test"))
    assert err.value.keyword == keyword
    assert "/src/x.dcm" in str(err.value) and keyword in str(err.value)


# --- the fast reader -------------------------------------------------------------------------------------

ODD = {"PatientName": "O'Brien^Mary  Ann", "StudyDescription": "CT  Head/Neck", "SeriesNumber": "05",
       "InstanceNumber": "007", "AccessionNumber": None, "PatientSex": ""}


def _normalised(got: Header) -> dict[str, str]:
    """Values without padding (the fast reader keeps it, pydicom strips it): what the rules read."""
    return {k: v.replace("\x00", "").strip() for k, v in got.values.items()}


def _pydicom_values(path: Path) -> dict[str, str]:
    return _normalised(read_header_pydicom(str(path)))


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, JPEGBaseline8Bit, pydicom.uid.ExplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [True, False])
def test_fast_reader_agrees_with_pydicom(tmp_path, syntax, undefined):
    path = make_instance(tmp_path / "a.dcm", transfer_syntax=syntax, undefined_length_sequence=undefined, **ODD)
    fast = read_header_fast(str(path))
    assert fast.reader == "fast"
    assert _normalised(fast) == _pydicom_values(path)
    assert fast.get("PatientName") == "O'Brien^Mary  Ann"
    assert fast.get("AccessionNumber") is None and fast.missing_reason("AccessionNumber") == "no such element"
    assert fast.missing_reason("PatientSex") == "empty value"


@pytest.mark.parametrize(("charset", "name"), [("ISO_IR 100", "Müller^Jürgen"), ("ISO_IR 192", "Доу^Джейн"),
                                               (None, "Plain^Ascii"), ("ISO_IR 144", "Иванов^Иван")])
def test_fast_reader_decodes_text_with_the_character_set(tmp_path, charset, name):
    path = make_instance(tmp_path / "a.dcm", charset=charset, PatientName=name, StudyDescription=name)
    fast = read_header_fast(str(path))
    assert fast.get("PatientName") == name == fast.get("StudyDescription")
    assert _normalised(fast) == _pydicom_values(path)


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"transfer_syntax": ExplicitVRBigEndian}, "big endian"),
    ({"transfer_syntax": DeflatedExplicitVRLittleEndian}, "deflated"),
    ({"charset": ["ISO 2022 IR 6", "ISO 2022 IR 87"]}, "code extensions"),
])
def test_other_encodings_fall_back_to_pydicom(tmp_path, kwargs, why):
    path = make_instance(tmp_path / "a.dcm", PatientName="Doe^Jane", SeriesNumber="05", **kwargs)
    got = read_header(str(path))
    assert got.reader == "pydicom", why
    assert got.get("PatientName") == "Doe^Jane" and got.get("SeriesNumber") == "05"


def test_the_reader_stops_after_its_last_tag(tmp_path):
    path = make_instance(tmp_path / "a.dcm")
    data = path.read_bytes()
    cut = data.index(b"SCANNER1") + 8  # PerformedStationAETitle's value: the last tag read
    path.write_bytes(data[:cut] + b"\x41\x00\x10\x00garbage-after-the-last-needed-tag")
    assert read_header_fast(str(path)).get("PerformedStationAETitle") == "SCANNER1"


def test_tags_table_matches_pydicom_dictionary():
    for tag, (keyword, _) in TAGS.items():
        assert pydicom.datadict.keyword_for_tag(tag) == keyword


def test_not_dicom(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello " * 100)
    with pytest.raises(NotDicomError, match="notes.txt: not a DICOM file"):
        read_header(str(path))


def test_truncated_file(tmp_path):
    path = make_instance(tmp_path / "a.dcm")
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"Doe^Jane") + 3])
    with pytest.raises(MalformedDicomError, match="a.dcm: .*truncated"):
        read_header(str(path))


@pytest.mark.parametrize("make", [lambda p: p, lambda p: p.mkdir() or p])
def test_unreadable_file(tmp_path, make):
    path = make(tmp_path / "gone.dcm")
    with pytest.raises(UnreadableFileError, match="gone.dcm: cannot read it"):
        read_header(str(path))


@pytest.mark.parametrize(("raw", "clean"), [
    ("Doe^Jane=", "Doe^Jane"), ("Doe^Jane==  ", "Doe^Jane"), ("Doe^Jane", "Doe^Jane"),
    ("=Yamada", "=Yamada"), ("Yamada^Tarou=山田^太郎=", "Yamada^Tarou=山田^太郎"), ("=", None), ("==", None),
])
def test_a_person_name_loses_its_empty_trailing_groups(raw, clean):
    h = header(PatientName=raw)
    assert h.get("PatientName") == clean
    assert h.missing_reason("PatientName") == (None if clean else "empty value")
    assert h.log_value("PatientName") == (clean or "Not defined")


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_a_trailing_equals_sign_gives_the_same_path_with_either_reader(tmp_path, syntax):
    src = make_instance(tmp_path / "x.dcm", transfer_syntax=syntax, raw={"PatientName": b"Doe^Jane="})
    assert b"Doe^Jane=" in src.read_bytes()
    h = read_header(str(src))
    assert h.reader == ("fast" if syntax == ExplicitVRLittleEndian else "pydicom")
    assert pack_path(h).patient == "PAT001-Doe_Jane-19800102"  # px-repack's (rx-repack: Doe_Jane_)
    assert h.get("PatientName") == read_header_pydicom(str(src)).get("PatientName") == "Doe^Jane"
