"""The series-meta DICOM dump (log kind 2) is what px-repack 3.10 (pydicom 2) writes, though we run pydicom 3.

The first tests pin each rule on a generated instance; the last compares, value for value,
with px-repack's own code run in its virtualenv (``tests/support/pypx_env.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomflow.repack.seriesmeta import dicom_dump
from tests.support.pypx_env import PypxUnavailable, px_dicom_dumps, px_repack
from tests.support.repack_dicom import make_instance


def rich_instance(path: Path, **tags) -> Path:
    """An instance with what px-repack renders its own way: empty numbers, nested sequences, overlays, padding."""
    make_instance(path, **tags)
    ds = dcmread(path)
    ds.add_new(0x00181050, "DS", None)  # SpatialResolution, empty
    ds.add_new(0x00280106, "US", None)  # SmallestImagePixelValue, empty
    ds.add_new(0x00180050, "DS", "1.000000")  # SliceThickness
    ds.add_new(0x00209167, "AT", 0x0019100A)  # FunctionalGroupPointer
    ds.add_new(0x00209165, "AT", [0x00100010, 0x0019100A])  # DimensionIndexPointer
    item = Dataset()
    item.add_new(0x00180050, "DS", "1.000000")
    item.add_new(0x00200032, "DS", "-12.500")
    item.add_new(0x00280030, "DS", ["0.5", "0.50000"])
    item.add_new(0x00200013, "IS", "07")
    item.add_new(0x00181050, "DS", None)
    item.add_new(0x00100010, "PN", "Doe^Jane")
    item.add_new(0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.4")
    item.add_new(0x00190010, "LO", "ACME")
    item.add_new(0x0019100A, "US", 5)
    item.add_new(0x00181310, "US", list(range(20)))
    item.add_new(0x00204000, "LT", "x" * 40)
    inner = Dataset()
    inner.add_new(0x00180050, "DS", "2.50")
    item.add_new(0x00400260, "SQ", Sequence([inner]))
    item.add_new(0x00082112, "SQ", Sequence([]))
    ds.add_new(0x00081140, "SQ", Sequence([item]))  # ReferencedImageSequence
    for group in (0x6000, 0x6002):  # two overlays
        ds.add_new(group << 16 | 0x0010, "US", 4 + group - 0x6000)  # OverlayRows
        ds.add_new(group << 16 | 0x0011, "US", 4)  # OverlayColumns
        ds.add_new(group << 16 | 0x0040, "CS", "G")  # OverlayType
        ds.add_new(group << 16 | 0x0050, "SS", [1, 1])  # OverlayOrigin
        ds.add_new(group << 16 | 0x0051, "US", 1)  # ImageFrameOrigin
        ds.add_new(group << 16 | 0x0100, "US", 1)  # OverlayBitsAllocated
        ds.add_new(group << 16 | 0x0102, "US", 0)  # OverlayBitPosition
        ds.add_new(group << 16 | 0x3000, "OW", b"\x00\x01")  # OverlayData
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 4)  # DataSetTrailingPadding, after PixelData
    ds.save_as(path)
    return path


@pytest.fixture
def dump(tmp_path) -> dict[str, str]:
    return {k: v["value"] for k, v in dicom_dump(str(rich_instance(tmp_path / "x.dcm"))).items()}


def test_an_empty_numeric_value_is_none_as_in_px_repack(dump):
    assert dump["SpatialResolution"] == dump["SmallestImagePixelValue"] == "None"


def test_elements_after_pixel_data_are_dumped_and_pixel_data_is_not(dump):
    assert dump["DataSetTrailingPadding"] == "b'\\x00\\x00\\x00\\x00'"
    assert "PixelData" not in dump


def test_repeating_group_elements_are_dumped_from_the_lowest_group(dump):
    assert dump["OverlayRows"] == "4"  # group 6000 (6002 has 6)
    assert (dump["ImageFrameOrigin"], dump["OverlayOrigin"], dump["OverlayData"]) == ("1", "[1, 1]", "b'\\x00\\x01'")


def test_tags_print_as_pydicom_2_does(dump):
    assert dump["FunctionalGroupPointer"] == "(0019, 100a)"
    assert dump["DimensionIndexPointer"] == "[(0010, 0010), (0019, 100a)]"


def test_a_sequence_prints_as_pydicom_2_does(dump):
    assert dump["SliceThickness"] == "1.000000"  # top level: the string as written
    assert dump["ReferencedImageSequence"] == "[" + "\n".join([
        "(0008, 0016) SOP Class UID                       UI: MR Image Storage",
        "(0008, 2112)  Source Image Sequence  0 item(s) ---- ",
        "(0010, 0010) Patient's Name                      PN: 'Doe^Jane'",
        "(0018, 0050) Slice Thickness                     DS: '1.0'",  # in a sequence: the float's repr
        "(0018, 1050) Spatial Resolution                  DS: None",
        "(0018, 1310) Acquisition Matrix                  US: Array of 20 elements",
        "(0019, 0010) Private Creator                     LO: 'ACME'",
        "(0019, 100a) Private tag data                    US: 5",
        "(0020, 0013) Instance Number                     IS: '7'",
        "(0020, 0032) Image Position (Patient)            DS: '-12.5'",
        "(0020, 4000) Image Comments                      LT: Array of 40 elements",
        "(0028, 0030) Pixel Spacing                       DS: [0.5, 0.50000]",
        "(0040, 0260)  Performed Protocol Code Sequence  1 item(s) ---- ",
        "   (0018, 0050) Slice Thickness                     DS: '2.5'",
        "   ---------",
    ]) + "]"


def test_keywords_are_sorted_and_labelled(tmp_path):
    dump = dicom_dump(str(rich_instance(tmp_path / "x.dcm")))
    assert list(dump) == sorted(dump)
    assert all(v["label"] == k for k, v in dump.items())


@pytest.fixture(scope="module")
def px_available() -> None:
    try:
        px_repack()
    except PypxUnavailable as exc:
        pytest.fail(f"px-repack is needed for the parity tests and could not be installed: {exc}")


#: Where we differ on purpose (docs/repack.md): pydicom 2 lists a repeating-group keyword
#: but cannot getattr() it, so px-repack writes "no attribute" as its value.
REPEATERS = {"OverlayRows", "OverlayColumns", "OverlayType", "OverlayOrigin", "ImageFrameOrigin",
             "OverlayBitsAllocated", "OverlayBitPosition", "OverlayData"}


def test_dump_equals_px_repacks_own(px_available, sag_anon: Path, tmp_path):
    files = [rich_instance(tmp_path / "rich.dcm", PatientName="Doe^Jane")]
    files.append(rich_instance(tmp_path / "utf8.dcm", charset="ISO_IR 192", PatientName="Доу^Джейн"))
    files.append(make_instance(tmp_path / "plain.dcm"))
    files += sorted(sag_anon.glob("*.dcm"))[:40]
    theirs = px_dicom_dumps([str(f) for f in files])
    for path, px in zip(files, theirs, strict=True):
        ours = {k: v["value"] for k, v in dicom_dump(str(path)).items()}
        assert list(ours) == list(px), path
        for keyword in REPEATERS & set(px):
            assert px.pop(keyword) == "no attribute" != ours.pop(keyword), (path, keyword)
        assert ours == px, path
