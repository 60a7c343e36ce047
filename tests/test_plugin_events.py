"""The plugin in a real Orthanc: one event per stored instance, batches, series/study events, status."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pydicom
from pydicom.multival import MultiValue
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian
import pytest

from dicomflow.orthanc_config import STABLE_SCRIPT
from tests.support.orthanc import EventSink, OrthancServer, leftovers, write_series
from tests.support.repack_dicom import make_instance
from tests.support.procs import wait_for

CALLING_AET = "OXITESTORTHANC"
COMPARED_TAGS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate",
                 "StudyDescription", "AccessionNumber", "Modality", "ProtocolName", "StudyInstanceUID",
                 "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "SOPInstanceUID", "SOPClassUID",
                 "InstanceNumber", "Rows", "Columns", "ImageType", "PatientAge", "StudyTime", "SeriesDate",
                 "Manufacturer", "BodyPartExamined")


def _expected(path: Path) -> tuple[dict[str, str], str]:
    """The headers pydicom reads (as Orthanc's strings) and the file's transfer syntax."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    headers = {}
    for tag in COMPARED_TAGS:
        if tag in ds and ds[tag].value not in (None, ""):
            value = ds[tag].value
            headers[tag] = "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
    return headers, str(ds.file_meta.TransferSyntaxUID)


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads, not its children)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: The ways the plugin builds events: headers read from the file's bytes by the builder process
#: (the default) or by the sender thread in Orthanc ("raw-thread"), or taken from Orthanc's JSON.
BUILDS = {
    "raw": {"HeaderReader": "raw"},
    "raw-thread": {"HeaderReader": "raw", "BuilderProcess": False, "GilSwitchInterval": 0.001},
    "json": {"HeaderReader": "json"},
}
#: Where Orthanc's own stable series/studies come from when a user asks for them (the default
#: is "off": the scheduler completes pushes): the Lua script, or the change log read every second.
STABLE_FROM = {"raw": "lua", "raw-thread": "changes", "json": "lua"}
STABLE_CONFIG = {"lua": ({}, {"LuaScripts": [str(STABLE_SCRIPT)]}), "changes": ({"StableEvents": "changes"}, {})}


@pytest.fixture(scope="module", params=list(BUILDS))
def ingest(request, tmp_path_factory, sag_anon, sag_anon_count):
    """One Orthanc with the plugin and a sink; sag-anon and a generated series sent once, each build way."""
    folder = tmp_path_factory.mktemp("plugin-events")
    sink = EventSink().start()
    options = BUILDS[request.param]
    stable_options, extra = STABLE_CONFIG[STABLE_FROM[request.param]]
    server = OrthancServer(folder / "orthanc", scheduler_url=sink.url, stable_age=2,
                           plugin_options={**options, **stable_options}, extra=extra).start()
    status = server.status()
    assert status["stableEvents"] == STABLE_FROM[request.param]
    assert status["headerReader"] == options["HeaderReader"]
    assert status["gilSwitchInterval"] == pytest.approx(options.get("GilSwitchInterval", 0.005))
    generated = write_series(folder / "generated", 25, patient_id="GEN0001")
    try:
        server.store([sag_anon], aet=CALLING_AET, pattern="*.dcm")
        server.store(generated, aet=CALLING_AET)
        sink.wait_for_events(sag_anon_count + 25, level="instance", timeout=60)
        status = server.status()
        if request.param == "raw":  # every event built outside Orthanc's interpreter
            assert (status["builder"], status["builtInPlugin"]) == ("process", 0)
        else:
            assert status["builder"] == "thread" and status["builtInPlugin"] >= sag_anon_count + 25
        # The sender thread's CPU: some, and part of Orthanc's own (the builder's is not in it).
        assert 0 < status["senderCpuSeconds"] <= _process_cpu_seconds(server.proc.pid)
        yield server, sink, sorted(sag_anon.glob("*.dcm")) + generated, folder
    finally:
        server.stop()
        sink.stop()
        assert not leftovers([server]), "the Orthanc started by the test is still running"


def test_every_instance_gives_one_event_with_its_headers(ingest):
    server, sink, files, _ = ingest
    events = [e for e in sink.delivered() if e["level"] == "instance"]
    by_uid = {}
    for event in events:
        uid = event["headers"]["SOPInstanceUID"]
        assert uid not in by_uid, f"two events for {uid}"
        by_uid[uid] = event
    assert len(by_uid) == len(files)  # sag-anon (192, or 16 in a fresh clone) + 25
    for path in files:
        headers, syntax = _expected(path)
        event = by_uid[headers["SOPInstanceUID"]]
        for tag, value in headers.items():
            assert event["headers"][tag] == value, (path.name, tag)
        assert event["transferSyntax"] == syntax
        assert event["remoteAet"] == CALLING_AET
        assert event["calledAet"] == server.aet
        assert event["remoteIp"] == "127.0.0.1"
        assert isinstance(event["receivedAt"], float)


def test_orthanc_ids_are_orthancs_own(ingest):
    server, sink, _, _ = ingest
    events = [e for e in sink.delivered() if e["level"] == "instance"]
    for series_id in server.get("/series"):
        series = server.get(f"/series/{series_id}")
        study = server.get(f"/studies/{series['ParentStudy']}")
        mine = [e for e in events if e["orthanc"]["series"] == series_id]
        assert {e["orthanc"]["instance"] for e in mine} == set(series["Instances"])
        for event in mine:
            assert event["orthanc"]["study"] == series["ParentStudy"]
            assert event["orthanc"]["patient"] == study["ParentPatient"]
    assert server.status()["idLookups"] == 0, "ids should be computed, not looked up"


def test_events_travel_in_batches(ingest):
    _, sink, files, _ = ingest
    batches = sink.delivered_batches()
    assert all(b.authorization == "Bearer test-token" for b in batches)
    instance_batches = [b for b in batches if any(e["level"] == "instance" for e in b.events)]
    assert len(instance_batches) < len(files) / 4, f"{len(instance_batches)} POSTs for {len(files)} events"


def test_stable_series_and_study_events_list_every_instance(ingest):
    server, sink, files, _ = ingest
    sag_count = len(files) - 25
    ours = ("1449c1d", "GEN0001")  # sag-anon's and the generated series' patients

    def events(level: str) -> list[dict]:
        return [e for e in sink.delivered() if e["level"] == level and e["headers"]["PatientID"] in ours]

    wait_for(lambda: len(events("series")) >= 2 and len(events("study")) >= 2, timeout=30,
             what="the series and study events")
    series_events, study_events = events("series"), events("study")
    assert len(series_events) == 2 and len(study_events) == 2
    for event in series_events:
        series = server.get(f"/series/{event['orthanc']['series']}")
        assert sorted(event["orthanc"]["instances"]) == sorted(series["Instances"])
        assert event["headers"]["SeriesInstanceUID"] == series["MainDicomTags"]["SeriesInstanceUID"]
        assert event["headers"]["StudyInstanceUID"]
        assert event["headers"]["PatientID"]
        assert event["orthanc"]["study"] == series["ParentStudy"]
    counts = sorted(len(e["orthanc"]["instances"]) for e in series_events)
    assert counts == sorted([25, sag_count])
    for event in study_events:
        study = server.get(f"/studies/{event['orthanc']['study']}")
        assert event["headers"]["StudyInstanceUID"] == study["MainDicomTags"]["StudyInstanceUID"]
        assert sorted(event["orthanc"]["seriesIds"]) == sorted(study["Series"])
        assert len(event["orthanc"]["instances"]) in (25, sag_count)


def test_a_series_stable_again_after_late_instances_is_sent_again(ingest):
    server, sink, _, folder = ingest
    first = write_series(folder / "late", 5, patient_id="LATE001")
    uid = pydicom.dcmread(first[0], stop_before_pixels=True)

    def mine() -> list[dict]:
        return [e for e in sink.delivered()
                if e["level"] == "series" and e["headers"]["SeriesInstanceUID"] == uid.SeriesInstanceUID]

    server.store(first)
    wait_for(lambda: len(mine()) == 1, timeout=30, what="the first series event")
    late = write_series(folder / "late2", 3, patient_id="LATE001", study_uid=uid.StudyInstanceUID,
                        series_uid=uid.SeriesInstanceUID, start=6)
    server.store(late)
    wait_for(lambda: len(mine()) == 2, timeout=30, what="the series event after late instances")
    before, after = mine()
    assert len(before["orthanc"]["instances"]) == 5
    assert len(after["orthanc"]["instances"]) == 8
    assert set(before["orthanc"]["instances"]) < set(after["orthanc"]["instances"])


def test_with_the_lua_script_no_change_is_read_while_orthanc_runs(ingest):
    server, sink, files, _ = ingest
    wait_for(lambda: [e for e in sink.delivered() if e["level"] == "study"], timeout=30, what="a study event")
    status = server.status()
    if status["stableEvents"] == "lua":
        # Every series/study event delivered came through the Lua script (the last ones may still travel).
        wait_for(lambda: server.status()["stableFromLua"] == sum(
            1 for e in sink.delivered() if e["level"] in ("series", "study")), timeout=10, what="the Lua count")
        assert server.status()["changesRead"] == 0  # a first start on an empty Orthanc: nothing to catch up
    else:
        assert status["changesRead"] >= len(files)  # every instance's change, to find the stable ones
        assert status["stableFromLua"] == 0


def test_the_stable_route_takes_only_orthanc_ids(ingest):
    server, sink, _, _ = ingest
    before = server.status()["received"], len(sink.delivered())
    for body in ("../../etc/passwd", "", "1234", "'; DROP TABLE spool; --"):
        answer = server.session.post(server.url + "/dicomflow/stable/series", data=body, timeout=10)
        assert answer.status_code == 400, body
    assert server.session.get(server.url + "/dicomflow/stable/series", timeout=10).status_code == 405
    assert (server.status()["received"], len(sink.delivered())) == before
    series_id = server.get("/series")[0]
    answer = server.session.post(server.url + "/dicomflow/stable/series", data=series_id, timeout=10)
    assert answer.status_code == 200 and answer.json() == {"queued": "series", "id": series_id}
    wait_for(lambda: len(sink.delivered()) > before[1], timeout=10, what="the series event")
    [event] = sink.delivered()[before[1]:]
    assert (event["level"], event["orthanc"]["series"]) == ("series", series_id)


def test_status_route_counts(ingest):
    server, sink, files, _ = ingest
    status = server.status()
    assert status["received"] >= len(files)
    assert status["delivered"] == len(sink.delivered())
    assert status["queueLength"] == 0
    assert status["spoolLength"] == 0
    assert status["rejected"] == 0 and status["deadLetters"] == 0
    assert status["callbackErrors"] == 0
    assert status["sender"] == "running"
    answer = server.session.post(server.url + "/dicomflow/status", timeout=10)
    assert answer.status_code == 405


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_a_syntax_the_reader_leaves_to_orthanc_still_gives_a_full_event(tmp_path, syntax):
    """The callback takes the bytes without asking Orthanc for their transfer syntax; where
    the raw reader cannot read them (big endian, deflated), Orthanc's REST API fills in."""
    sink = EventSink().start()
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url).start()
    try:
        path = make_instance(tmp_path / "odd.dcm", transfer_syntax=syntax)
        server.post("/instances", path.read_bytes())
        (event,) = sink.wait_for_events(1, level="instance", timeout=30)
        headers, file_syntax = _expected(path)
        assert file_syntax == syntax and event["transferSyntax"] == syntax
        for tag, value in headers.items():
            assert event["headers"][tag] == value, tag
        assert event["orthanc"]["instance"] in server.get("/instances")
        # Uploaded over HTTP: a remote IP, no called AE title, and no error for the missing one.
        assert (event["remoteIp"], event["calledAet"]) == ("127.0.0.1", None)
        assert server.status()["callbackErrors"] == 0
        assert "CalledAET" not in server.log_tail(400)
    finally:
        server.stop()
        sink.stop()


def test_a_users_own_stable_series_callback_loaded_before_the_plugins_still_runs(tmp_path):
    own = tmp_path / "own.lua"
    own.write_text("function OnStableSeries(seriesId, tags, metadata)\n"
                   "  print('own OnStableSeries ' .. seriesId .. ' ' .. tags['SeriesInstanceUID'])\nend\n")
    sink = EventSink().start()
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url, stable_age=1,
                           extra={"LuaScripts": [str(own), str(STABLE_SCRIPT)]}).start()
    try:
        server.store(write_series(tmp_path / "dcm", 3, patient_id="OWNLUA1"))
        [event] = sink.wait_for_events(1, timeout=30, level="series")
        series_id, uid = event["orthanc"]["series"], event["headers"]["SeriesInstanceUID"]
        wait_for(lambda: f"own OnStableSeries {series_id} {uid}" in server.log_tail(200), timeout=10,
                 what="the user's own OnStableSeries in Orthanc's log")
        assert server.status()["stableFromLua"] == 2  # the series and its study, through dicomflow's script
    finally:
        server.stop()
        sink.stop()


def test_by_default_orthanc_hands_over_no_stable_series_or_study(tmp_path):
    """Series/study completion is the scheduler's (scheduler/pushes.py): with run.sh's
    configuration the plugin sends instance events only, and reads no change log for them."""
    sink = EventSink().start()
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url, stable_age=1).start()
    try:
        assert "LuaScripts" not in server.config and server.status()["stableEvents"] == "off"
        server.store(write_series(tmp_path / "dcm", 3, patient_id="NOSTABLE1"))
        sink.wait_for_events(3, level="instance")
        # Orthanc itself logs the series and the study stable ...
        wait_for(lambda: {"StableSeries", "StableStudy"} <= {c["ChangeType"] for c in
                                                            server.get("/changes?limit=100")["Changes"]},
                 timeout=30, what="Orthanc's StableSeries and StableStudy changes")
        # ... and the plugin, with nothing more to deliver, has sent none of them.
        wait_for(lambda: server.status()["queueLength"] == 0, timeout=10, what="the plugin's queue to drain")
        assert [e["level"] for e in sink.delivered()] == ["instance"] * 3
        assert server.status()["changesRead"] == 0
    finally:
        server.stop()
        sink.stop()


def test_the_first_event_after_a_quiet_spell_is_not_held_for_the_batch_delay(tmp_path):
    """MaxBatchDelay bounds how long a burst's events wait to be batched, not how long a study's
    first instance waits: after a quiet spell it goes after FIRST_LINGER (50 ms), and the burst
    behind it in growing batches (issue 23: the first registration in CUBE came up to 0.5 s late)."""
    sink = EventSink().start()
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url, plugin_options={"MaxBatchDelay": 20}).start()
    try:
        for n, patient in enumerate(("QUIET1", "QUIET2"), start=1):
            single = write_series(tmp_path / patient, 1, patient_id=patient)
            stored = time.time()
            server.store(single)
            sink.wait_for_events(n, level="instance", timeout=30)
            assert sink.delivered_batches()[-1].arrived - stored < 3, "held for MaxBatchDelay (20 s)"
        burst = write_series(tmp_path / "burst", 40, patient_id="BURST1")
        server.store(burst)
        sink.wait_for_events(42, level="instance", timeout=60)
        batches = [b for b in sink.delivered_batches()[2:] if any(e["level"] == "instance" for e in b.events)]
        assert 1 <= len(batches) <= 6, f"{len(batches)} POSTs for a burst of 40: not batched"
    finally:
        server.stop()
        sink.stop()
