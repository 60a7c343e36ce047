"""The raw header reader against Orthanc's own answer, tag by tag (issue 16, item 10).

The README promises that an event's headers are Orthanc's simplified JSON. The plugin reads
them from the file's bytes (`dicomflow.dicomheader`, through `dicomflow_events.EventBuilder`);
this test stores a corpus in a real Orthanc and compares, for every tag of the plugin's
default list, the reader's value with `GET /instances/{id}/simplified-tags` and with the
plugin's JSON path (`GetInstanceAdvancedJson`, the "json" HeaderReader, whose events leave
nulls out). The corpus: one file per way Orthanc's strings differ from a naive decode
(ISO_IR 13's yen sign, ISO_IR 6's filter, the 256-byte limit, padding, NULs, bad UTF-8,
each character set, UN and mismatched VRs) and every pydicom test file Orthanc accepts.
"""

from __future__ import annotations

import io
import struct
import sys
import warnings
from pathlib import Path

import pytest
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicomflow import dicomheader
from tests.support.orthanc import EventSink, OrthancServer, leftovers
from tests.support.procs import wait_for

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "orthanc"))

from dicomflow_events import EventBuilder, computed_ids  # noqa: E402
from dicomflow_settings import DEFAULT_TAGS  # noqa: E402 - the plugin's settings (no `orthanc` import)


TAGS = DEFAULT_TAGS
MAX_STRING_LENGTH = 256

#: For the character-set files: every 8-bit byte, and every 7-bit one from the space on but the
#: backslash (the multi-value separator).
_HIGH = bytes(range(0x80, 0x100))
_PRINTABLE = bytes(b for b in range(0x20, 0x80) if b != 0x5C)


def _file(elements: dict[int, tuple[str, bytes]], *, implicit: bool = False) -> bytes:
    """A Part 10 file written by pydicom, holding exactly these bytes as values (padding included).

    pydicom would clean up a raw value (strip it, re-encode it, fix its VR) before writing
    it: each value is written as a placeholder of the same length with the VR given, then
    replaced by its bytes. US values are written as numbers, UN ones as they are.
    """
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "DHO"
    ds.Modality = "OT"
    placeholders = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's opinion of the placeholders (charset, UIDs)
        for letter, (tag, (vr, value)) in zip("jkmnpqvwxzJKMNPQVWXZ", elements.items(), strict=False):
            if len(value) % 2:  # padded as a writer would
                value += b"\x00" if vr in ("UI", "UN") else b" "
            if vr == "US":
                ds.add_new(tag, vr, list(struct.unpack(f"<{len(value) // 2}H", value)) or None)
            elif vr == "UN":
                ds.add_new(tag, vr, value)
            else:
                written = "LO" if vr in ("IS", "DS") else vr  # (pydicom wants numbers there)
                ds.add_new(tag, written, letter * len(value))
                placeholders.append((written.encode(), vr.encode(), letter.encode() * len(value), value))
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True, implicit_vr=implicit)
    data = out.getvalue()
    for written, vr, placeholder, value in placeholders:
        length = struct.pack("<I" if implicit else "<H", len(value))
        key, replacement = (length + placeholder, length + value) if implicit else \
            (written + length + placeholder, vr + length + value)
        assert data.count(key) == 1, placeholder
        data = data.replace(key, replacement)
    return data


def _cases() -> dict[str, bytes]:
    """One file per difference between Orthanc's strings and a plain decode of the bytes."""
    utf8, latin1 = (0x00080005, ("CS", b"ISO_IR 192")), (0x00080005, ("CS", b"ISO_IR 100"))
    cases = {
        # JIS X 0201: 0x5C is the yen sign and 0x7E the overline, in every string (ImageType too).
        "iso-ir-13": _file({0x00080005: ("CS", b"ISO_IR 13 "), 0x00100010: ("PN", b"YAMADA^TAROU"),
                            0x00081030: ("LO", b"HAKATA\x5cEKI~"), 0x00080080: ("LO", b"\xc4\xb3\xb7\xae\xb3 "),
                            0x00080008: ("CS", b"ORIGINAL\\PRIMARY")}),
        # ISO_IR 6 is ASCII to Orthanc: 8-bit bytes and control characters (but LF) are dropped.
        "iso-ir-6-8bit": _file({0x00080005: ("CS", b"ISO_IR 6"), 0x00100010: ("PN", b"M\xfcller^Hans"),
                                0x00081030: ("LO", b"tab\there\r\nx\x1bY\x7f ")}),
        # No character set: Orthanc's default (Latin-1), control characters kept.
        "no-charset-8bit": _file({0x00100010: ("PN", b"M\xfcller^Hans"), 0x00081030: ("LO", b"a\tb\x80\x9f ")}),
        # The limit counts UTF-8 bytes once padding is gone; an over-long value is null.
        "long-utf8": _file(dict([utf8, (0x00081030, ("LO", "é".encode() * 130)),
                                 (0x00080090, ("PN", "é".encode() * 128)),
                                 (0x00081010, ("SH", b"b" * 256 + b"  ")),
                                 (0x0008103E, ("LO", b"c" * 257 + b" ")),
                                 (0x00101010, ("AS", b"d" * 255 + b"\x00  "))])),
        "long-latin1": _file(dict([latin1, (0x00081030, ("LO", b"\xe9" * 130)), (0x00080080, ("LO", b"\xe9" * 128)),
                                   (0x00081010, ("SH", b"\xe9" * 129 + b" "))])),
        # Leading spaces stay, trailing spaces go (but not past a NUL); UIDs lose every space.
        "spaces": _file({0x00100020: ("LO", b" P1 "), 0x00100010: ("PN", b"  Doe^J "), 0x0008103E: ("LO", b"  "),
                         0x00080050: ("SH", b"A1 \x00"), 0x00200013: ("IS", b" 12 "), 0x00200010: ("SH", b"\tS\t "),
                         0x00081030: ("LO", b"x  \x00  "), 0x00100040: ("CS", b" M"),
                         0x0020000D: ("UI", b" %s \x00" % generate_uid().encode()[:50])}),
        # A value ends at its first NUL.
        "nul": _file({0x00100010: ("PN", b"AB\x00CD "), 0x00081030: ("LO", b"\x00XYZ "), 0x00080080: ("LO", b"X\x00"),
                      0x00080021: ("DA", b"2024\x000101")}),
        # Orthanc skips invalid UTF-8 as boost::locale does (an invalid continuation byte included).
        "bad-utf8": _file(dict([utf8, (0x00100010, ("PN", b"Bad\xff\xfeName")), (0x00081030, ("LO", b"caf\xc3A ")),
                                (0x00080080, ("LO", b"\xe2\x82A\xed\xa0\x80B")),
                                (0x00081010, ("SH", b"\xc0\x80C\xf5D")),
                                (0x0008103E, ("LO", b"end\xc3 ")), (0x00080090, ("PN", b"ok\xe2\x82 ")),
                                (0x00180015, ("CS", b"\xf0\x9f\x98\x80\xf4\x90\x80\x80Z ")),
                                (0x00080070, ("LO", b"\xe0\x80\xafQ ")), (0x00181030, ("LO", b"\xf0\x9f\x98 ")),
                                (0x00200010, ("SH", b"\xed\x9f\xbf\xee\x80\x80.\xdf")),
                                (0x00080008, ("CS", b"A\x80\\B\xbf\xbf"))])),
        "implicit": _file({0x00100020: ("LO", b" P2 "), 0x0008103E: ("LO", b"x \x00 "), 0x00100010: ("PN", b"N\x00M "),
                           0x00280010: ("US", struct.pack("<H", 512))}, implicit=True),
        # UN (Orthanc converts it by the dictionary, keeping padding), VRs unlike the dictionary's.
        "un-and-vr": _file({0x00100010: ("UN", b" A B \x00"), 0x00081030: ("UN", b"x\x00y "),
                            0x0008103E: ("UN", b"z\x00\x00\x00"), 0x00081010: ("UI", b" 9.8 \x00"),
                            0x00200010: ("LT", b" 1.2.3 ")}),
        "us-values": _file({0x00280010: ("US", struct.pack("<HH", 5, 6)), 0x00280011: ("US", b"")}),
        "gb18030": _file({0x00080005: ("CS", b"GB18030"), 0x00100010: ("PN", "王^小东".encode("gb18030")),
                          0x00081030: ("LO", "中文描述 ¥".encode("gb18030"))}),
        "gbk": _file({0x00080005: ("CS", b"GBK"), 0x00100010: ("PN", "王^小东".encode("gbk"))}),
    }
    # Every byte under each single-byte character set (Orthanc skips the undefined ones).
    for term in ("ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 144", "ISO_IR 127",
                 "ISO_IR 126", "ISO_IR 138", "ISO_IR 148", "ISO_IR 203", "ISO_IR 166", "ISO_IR 13"):
        cases[f"all-bytes {term}"] = _file({
            0x00080005: ("CS", term.encode().ljust(len(term) + len(term) % 2)),
            0x00081030: ("LT", _PRINTABLE + b"!"), 0x0008103E: ("LT", _HIGH[:64]),
            0x00080080: ("LO", _HIGH[64:]), 0x00080090: ("PN", b"\xa1\xb0\xc0\xdf\xe9\xfe")})
    return cases


def _pydicom_files() -> list[Path]:
    return sorted(Path(p) for p in get_testdata_files() + get_charset_files() if Path(p).is_file())


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """The corpus stored in a real Orthanc whose plugin reads headers from Orthanc's JSON.

    Yields {name: (instance id, bytes)} of the files Orthanc stored, the plugin's events by
    instance id, the names of the files left out (refused by Orthanc, or duplicates of an
    instance already stored: Orthanc keeps the first file, which is the one compared), the
    server, and the names of the generated cases.
    """
    folder = tmp_path_factory.mktemp("dicomheader-orthanc")
    cases = _cases()
    corpus = dict(cases)
    for path in _pydicom_files():
        corpus[f"pydicom {path.name}"] = path.read_bytes()
    sink = EventSink().start()
    server = OrthancServer(folder / "orthanc", scheduler_url=sink.url, plugin_options={"HeaderReader": "json"})
    try:
        server.start()
        assert server.status()["headerReader"] == "json"
        files, skipped = {}, {"refused": [], "duplicate": []}
        for name, data in corpus.items():
            answer = server.session.post(server.url + "/instances", data=data, timeout=30)
            if answer.status_code != 200:
                skipped["refused"].append(name)
            elif answer.json().get("Status") == "AlreadyStored":
                skipped["duplicate"].append(name)
            else:
                files[name] = (answer.json()["ID"], data)
        wanted = {instance_id for instance_id, _ in files.values()}

        def every_event() -> dict[str, dict] | None:
            events = {e["orthanc"]["instance"]: e for e in sink.delivered() if e["level"] == "instance"}
            return events if wanted <= set(events) else None

        events = wait_for(every_event, timeout=60, what="an event for every stored instance")
        status = server.status()
        assert (status["callbackErrors"], status["lastError"]) == (0, None), status
        yield files, events, skipped, server, set(cases)
    finally:
        server.stop()
        sink.stop()
        assert not leftovers([server]), "the Orthanc started by the test is still running"


def test_reader_gives_orthancs_simplified_values(stored):
    files, events, skipped, server, cases = stored
    builder = EventBuilder(dicomheader, TAGS, MAX_STRING_LENGTH)
    differences, compared, handed_over, ids_differ, orthanc_disagrees = [], [], [], [], set()
    for name, (instance_id, data) in files.items():
        orthanc = server.get(f"/instances/{instance_id}/simplified-tags")
        expected = {tag: orthanc[tag] for tag in TAGS if tag in orthanc}
        try:
            _syntax, mine = builder.read(data)
        except dicomheader.HeaderError as exc:
            # Left to Orthanc: the plugin then reads these headers from simplified-tags.
            handed_over.append((name, exc.kind, exc.reason))
            continue
        compared.append(name)
        differences += [f"{name}: {tag}: Orthanc {expected.get(tag, '<absent>')!r} reader {mine.get(tag, '<absent>')!r}"
                        for tag in TAGS if expected.get(tag, "<absent>") != mine.get(tag, "<absent>")]
        # The plugin's JSON path too (its events leave nulls out), where Orthanc's two answers
        # agree: its JSON path leaves out public tags encoded as UN, and has NumberOfFrames
        # where the file has none or an invalid one (and, for ISO 2022 files, which the reader
        # hands over, keeps escape sequences that simplified-tags removes).
        json_headers = events[instance_id]["headers"]
        disagree = {tag for tag in TAGS if json_headers.get(tag) != expected.get(tag)}
        orthanc_disagrees.update(f"{name}: {tag}" for tag in disagree)
        differences += [f"{name}: {tag}: plugin's JSON {json_headers.get(tag)!r} reader {mine.get(tag)!r}"
                        for tag in TAGS if tag not in disagree and json_headers.get(tag) != mine.get(tag)]
        if computed_ids(instance_id, mine) is None:  # the ids are computed from these values as Orthanc does
            ids_differ.append(name)
    assert not differences, "\n".join(differences)
    assert not ids_differ
    assert {d.split(":")[0] for d in orthanc_disagrees} <= {
        "pydicom rtdose_rle.dcm", "pydicom SC_rgb_jpeg_gdcm.dcm", "pydicom badVR.dcm"}, sorted(orthanc_disagrees)
    assert cases <= set(compared) | {n for n, _, _ in handed_over}, "a generated case was not stored"
    # Every generated case is read here, not handed over, but two rare ones: ISO_IR 13 bytes
    # outside JIS X 0201 (Orthanc reads Shift-JIS double bytes there), and ISO_IR 203, which
    # Orthanc 1.10 does not know (it keeps ASCII only; a later Orthanc may know it).
    assert {n for n, _, _ in handed_over} & cases == {"all-bytes ISO_IR 13", "all-bytes ISO_IR 203"}, handed_over
    pydicom_compared = [n for n in compared if n.startswith("pydicom ")]
    print(f"compared {len(compared)} files ({len(pydicom_compared)} of pydicom's), handed over "
          f"{len(handed_over)}, refused by Orthanc {len(skipped['refused'])}, duplicates {len(skipped['duplicate'])}")
    assert len(pydicom_compared) >= 100, (len(pydicom_compared), skipped, handed_over)
    # What is handed over: transfer syntaxes and character sets this reader leaves to Orthanc.
    assert {kind for _, kind, _ in handed_over} <= {"unsupported", "not-dicom"}, handed_over
    assert len(handed_over) <= 15, handed_over
    assert len(skipped["refused"]) + len(skipped["duplicate"]) < len(_pydicom_files()) / 2, skipped


def test_vrs_are_the_dictionarys():
    """Implicit VR values are read by these VRs, as Orthanc (DCMTK) reads them by its dictionary."""
    from pydicom.datadict import dictionary_VR

    assert set(dicomheader.VRS) == {tag for tag, _ in dicomheader.KEYWORDS.values()}
    assert {tag: dictionary_VR(tag).encode() for tag in dicomheader.VRS} == dicomheader.VRS


def test_the_reader_gives_null_as_orthanc_does():
    """Over-long values are None (Orthanc's null), not left out; the limit counts UTF-8 bytes."""
    builder = EventBuilder(dicomheader, ("StudyDescription", "InstitutionName", "StationName"), 256)
    data = _file({0x00080005: ("CS", b"ISO_IR 192"), 0x00081030: ("LO", "é".encode() * 129),
                  0x00080080: ("LO", "é".encode() * 128), 0x00081010: ("SH", b"s" * 256 + b"  ")})
    _, values = builder.read(data)
    assert values == {"StudyDescription": None, "InstitutionName": "é" * 128, "StationName": "s" * 256}
