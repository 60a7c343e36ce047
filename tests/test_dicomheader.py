"""The shared standard-library header reader (used by the plugin and the repack command)."""

from __future__ import annotations

import io
import subprocess
import sys

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicomflow import dicomheader, part10
from tests.conftest import REPO
from tests.support.orthanc import write_series

WANTED = {tag for tag, _ in dicomheader.KEYWORDS.values()}
TEXT = {tag for tag, text in dicomheader.KEYWORDS.values() if text}
LAST = max(WANTED)


def _pydicom_values(path) -> dict[int, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    out = {}
    for tag in WANTED:
        if tag in ds:
            value = ds[tag].value
            out[tag] = "\\".join(str(v) for v in value) if isinstance(value, pydicom.multival.MultiValue) \
                else str(value if value is not None else "")
    return out


def test_reads_what_pydicom_reads_from_bytes_and_files(sag_anon, tmp_path):
    files = sorted(sag_anon.glob("*.dcm"))[:5] + write_series(tmp_path / "gen", 3)
    for path in files:
        data = path.read_bytes()
        syntax, found = dicomheader.read_elements(data, WANTED, LAST)
        assert syntax == str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        values = {tag: v.strip("\x00 ") for tag, v in dicomheader.decode(found, TEXT).items()}
        assert values == {t: v.strip() for t, v in _pydicom_values(path).items()}, path.name
        with open(path, "rb") as file:
            assert dicomheader.read_elements(file, WANTED, LAST) == (syntax, found)


def test_errors_have_kinds(tmp_path, sag_anon):
    data = next(sag_anon.glob("*.dcm")).read_bytes()
    with pytest.raises(dicomheader.HeaderError) as not_dicom:
        dicomheader.read_elements(b"\x00" * 200, WANTED, LAST)
    assert not_dicom.value.kind == "not-dicom"
    with pytest.raises(dicomheader.HeaderError) as truncated:
        dicomheader.read_elements(data[:700], WANTED, LAST)
    assert truncated.value.kind == "malformed" and "truncated" in truncated.value.reason
    big = data.replace(b"1.2.840.10008.1.2.1\x00", ExplicitVRBigEndian.encode() + b"\x00", 1)
    assert big != data
    with pytest.raises(dicomheader.HeaderError) as unsupported:
        dicomheader.read_elements(big, WANTED, LAST)
    assert unsupported.value.kind == "unsupported"
    with pytest.raises(dicomheader.HeaderError) as charset:
        dicomheader.decode({0x00080005: b"ISO 2022 IR 87"}, TEXT)
    assert charset.value.kind == "unsupported"


def test_imports_only_the_standard_library():
    """Orthanc's embedded Python has no third-party packages: the plugin imports this module."""
    code = ("import sys; before = set(sys.modules); from dicomflow import dicomheader; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(m for m in new if m not in sys.stdlib_module_names and m != 'dicomflow'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_absurdly_nested_sequences_are_malformed_not_a_crash(sag_anon):
    data = next(sag_anon.glob("*.dcm")).read_bytes()
    import struct
    meta_end = 132 + 12 + struct.unpack_from("<I", data, 140)[0]  # (0002,0000) holds the meta group's length
    nested = b"".join(b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
                      for _ in range(700))
    with pytest.raises(dicomheader.HeaderError) as deep:
        dicomheader.read_elements(data[:meta_end] + nested, {0x00100020}, 0x00100020)
    assert deep.value.kind == "malformed"


def _variants(path, tmp_path):
    """`path` with nested undefined-length sequences before the wanted tags, and that as Implicit VR LE."""
    ds = pydicom.dcmread(path)
    inner = Dataset()
    inner.CodeValue = "X"
    item = Dataset()
    item.ConceptCodeSequence = Sequence([inner])
    ds.ProcedureCodeSequence = Sequence([item, Dataset()])
    for element in (ds["ProcedureCodeSequence"], item["ConceptCodeSequence"]):
        element.is_undefined_length = True
        for each in element.value:
            each.is_undefined_length_sequence_item = True
    ds.save_as(tmp_path / "undefined.dcm")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(tmp_path / "implicit.dcm", implicit_vr=True, little_endian=True)
    return [tmp_path / "undefined.dcm", tmp_path / "implicit.dcm"]


def test_implicit_vr_and_undefined_length_sequences(sag_anon, tmp_path):
    for path in _variants(sorted(sag_anon.glob("*.dcm"))[0], tmp_path):
        data = path.read_bytes()
        syntax, found = dicomheader.read_elements(data, WANTED, LAST)
        assert syntax == str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        values = {tag: v.strip("\x00 ") for tag, v in dicomheader.decode(found, TEXT).items()}
        assert values == {t: v.strip() for t, v in _pydicom_values(path).items()}, path.name


def _outcome(source):
    try:
        return dicomheader.read_elements(source, WANTED | {0x00081032}, LAST)
    except dicomheader.HeaderError as exc:
        return exc.kind, exc.reason


def test_files_read_in_small_chunks_answer_as_bytes_do(sag_anon, tmp_path, monkeypatch):
    """The parser runs on the part of a file read so far and asks for more: errors included,
    the answers are those of the whole file as bytes, even in chunks far smaller than a header."""
    path = _variants(sorted(sag_anon.glob("*.dcm"))[0], tmp_path)[0]
    data = path.read_bytes()
    monkeypatch.setattr(part10, "_CHUNK", 100)
    cuts = [len(data), 100, 131, 132, 300, 700, 850, 1000, 1500, 2000, 5000, 20000, 100000]
    kinds = set()
    for cut in cuts:
        expected = _outcome(data[:cut])
        kinds.add("ok" if isinstance(expected[1], dict) else expected[0])
        assert _outcome(io.BytesIO(data[:cut])) == expected, cut
        assert _outcome(memoryview(data[:cut])) == expected, cut
    assert kinds == {"ok", "not-dicom", "unsupported", "malformed"}
