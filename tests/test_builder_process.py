"""The plugin's builder process, run as the plugin runs it: what crosses its pipe, and the events.

Outside Orthanc: the builder is a plain child process (standard library only); the same
events through Orthanc are covered by test_plugin_events.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pydicom
import pytest

from dicomflow import dicomheader
from tests.support.orthanc import write_series
from tests.support.procs import free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "orthanc"))

from dicomflow_builder import PREFIX, BuilderProcess  # noqa: E402
from dicomflow_events import EventBuilder, orthanc_id  # noqa: E402

TAGS = ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
        "InstanceNumber", "Modality", "Rows", "Columns")
CONTEXT = ("MODALITY", "127.0.0.1", "DICOMFLOW", None, 1764000000.0)


class RecordingBuilder(BuilderProcess):
    """The real builder process; notes the requests handed to it (what crosses the pipe)."""

    def __init__(self) -> None:
        super().__init__(sys.executable, str(REPO), TAGS, 256)
        self.requests: list[list[tuple]] = []

    def build(self, requests, keep=False):
        self.requests.append(requests)
        return super().build(requests, keep)


@pytest.fixture
def builder():
    process = RecordingBuilder()
    process.start()
    yield process
    process.close()


def _item(path: Path, seq: int = 1) -> tuple[int, str, bytes, tuple]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    instance_id = orthanc_id(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return seq, instance_id, path.read_bytes(), CONTEXT


def _whole_file_event(item: tuple[int, str, bytes, tuple]) -> str:
    _, instance_id, data, context = item
    return EventBuilder(dicomheader, TAGS, 256).build(instance_id, data, True, *context)


def test_a_small_file_crosses_the_pipe_only_up_to_its_pixel_data(tmp_path, builder):
    item = _item(write_series(tmp_path, 1, rows=64, columns=64)[0])
    data = item[2]
    pixel_data = data.index(b"\xe0\x7f\x10\x00OW")

    built = builder.build_events([item])

    assert built == {1: _whole_file_event(item)}
    assert built[1] is not None and '"SOPInstanceUID"' in built[1]
    [[(seq, _, sent, complete, *_)]] = builder.requests
    assert (seq, complete) == (1, False)
    assert sent == data[:pixel_data + 12]  # the header and the pixel data's element header, no pixels
    assert len(data) - len(sent) == 64 * 64 * 2  # every byte but the pixels


def test_the_pixel_data_tag_inside_a_header_value_costs_a_second_round_not_the_event(tmp_path, builder):
    path = write_series(tmp_path, 1, rows=64, columns=64)[0]
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0009, "DICOMFLOW TEST", create=True)
    block.add_new(0x01, "OB", b"\xe0\x7f\x10\x00" * 4)  # before the patient module: the cut comes too early
    ds.save_as(path)
    item = _item(path)

    built = builder.build_events([item])

    assert built == {1: _whole_file_event(item)}
    assert '"PatientName"' in built[1]
    assert len(builder.requests) == 2  # the first cut ended inside the header: the builder asked for more
    assert len(builder.requests[1][0][2]) > len(builder.requests[0][0][2])


def test_a_file_without_pixel_data_goes_as_its_first_bytes(tmp_path, builder):
    path = write_series(tmp_path, 1, rows=64, columns=64)[0]
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    item = _item(path)

    built = builder.build_events([item])

    assert built == {1: _whole_file_event(item)}
    [[(_, _, sent, complete, *_)]] = builder.requests
    assert sent == item[2][:PREFIX] and complete is (len(item[2]) <= PREFIX)


def test_the_builder_process_yields_the_cpu_by_its_nice_increment(tmp_path):
    item = _item(write_series(tmp_path, 1)[0])
    process = BuilderProcess(sys.executable, str(REPO), TAGS, 256, nice=7)
    process.start()
    try:
        assert process.build_events([item]) == {1: _whole_file_event(item)}  # it has read its configuration
        child = os.getpriority(os.PRIO_PROCESS, process.pid)
    finally:
        process.close()
    assert child == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)


def _delivering_builder(url: str, token: str = "test-token") -> BuilderProcess:
    delivery = {"url": url, "token": token, "eventsPath": "/api/v1/events", "connectTimeout": 2.0,
                "requestTimeout": 5.0}
    process = BuilderProcess(sys.executable, str(REPO), TAGS, 256, delivery=delivery)
    process.start()
    return process


def test_a_delivering_builder_posts_its_kept_events_and_the_plugins_in_order(tmp_path, sink):
    first, second = (_item(path, seq) for seq, path in enumerate(write_series(tmp_path, 2), start=1))
    built_elsewhere = json.dumps({"level": "series", "orthanc": {"series": "s1"}})
    process = _delivering_builder(sink.url)
    try:
        assert process.build_events([first, second], keep=True) == {1: True, 2: True}  # no JSON comes back
        status, _, rows = process.deliver([2, (3, built_elsewhere), 1])
    finally:
        process.close()

    assert (status, rows) == (200, None)
    [batch] = sink.delivered_batches()
    assert batch.events == [json.loads(_whole_file_event(second)), json.loads(built_elsewhere),
                            json.loads(_whole_file_event(first))]


@pytest.mark.parametrize("outage", ["unreachable", "503", "wrong token"])
def test_a_batch_the_scheduler_did_not_take_comes_back_whole(tmp_path, sink, outage):
    """The plugin spools (or buries) what the builder could not deliver: it gets every event's JSON."""
    item = _item(write_series(tmp_path, 1)[0])
    url = f"http://127.0.0.1:{free_port()}" if outage == "unreachable" else sink.url
    sink.status = 503 if outage == "503" else 200
    process = _delivering_builder(url, token="wrong" if outage == "wrong token" else "test-token")
    try:
        assert process.build_events([item], keep=True) == {1: True}
        status, reason, rows = process.deliver([1, (2, '{"level": "study"}')])
    finally:
        process.close()

    assert status == {"unreachable": None, "503": 503, "wrong token": 401}[outage]
    assert reason  # the error, or the start of the scheduler's answer
    assert rows == [(1, _whole_file_event(item)), (2, '{"level": "study"}')]
    assert sink.delivered_batches() == []
