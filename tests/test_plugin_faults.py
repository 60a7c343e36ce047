"""The plugin's delivery under faults: scheduler down, Orthanc killed, full queue, wrong token."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from tests.support.orthanc import EventSink, OrthancServer, leftovers, stop_all, write_series
from tests.support.procs import wait_for

#: Fast back-off so an outage's end is noticed within a second.
FAST_RETRY = {"RetryMinDelay": 0.2, "RetryMaxDelay": 0.5}


@pytest.fixture()
def servers() -> Iterator[list[OrthancServer]]:
    """Orthanc servers a test starts; all stopped afterwards, none left running."""
    started: list[OrthancServer] = []
    yield started
    stop_all(started)
    assert not leftovers(started), "an Orthanc started by the test is still running"


@pytest.fixture()
def sink() -> Iterator[EventSink]:
    sink = EventSink().start()
    yield sink
    sink.stop()


def _instance_events(sink: EventSink) -> list[dict]:
    return [e for e in sink.delivered() if e["level"] == "instance"]


def _assert_in_order_once(events: list[dict], expected: int) -> None:
    numbers = [int(e["headers"]["InstanceNumber"]) for e in events]
    assert numbers == list(range(1, expected + 1)), numbers
    received = [e["receivedAt"] for e in events]
    assert received == sorted(received)


def test_scheduler_down_during_a_send_spools_then_delivers_in_order_once(tmp_path, servers, sink):
    files = write_series(tmp_path / "dcm", 60, patient_id="DOWN001")
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url, plugin_options=FAST_RETRY)
    servers.append(server.start())
    server.store(files[:30])
    sink.wait_for_events(30)
    sink.stop()
    server.store(files[30:])
    wait_for(lambda: server.status()["spoolLength"] == 30, timeout=20, what="30 spooled events")
    assert len(_instance_events(sink)) == 30
    sink.start()
    sink.wait_for_events(60, timeout=20)
    wait_for(lambda: server.status()["spoolLength"] == 0, timeout=10, what="an empty spool")
    _assert_in_order_once(_instance_events(sink), 60)
    status = server.status()
    assert status["delivered"] == 60 and status["spooled"] >= 30 and status["failed"] >= 30


def test_spooled_events_survive_sigkill_of_orthanc(tmp_path, servers, sink):
    files = write_series(tmp_path / "dcm", 20, patient_id="KILL001")
    sink.stop()
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url, plugin_options=FAST_RETRY)
    servers.append(server.start())
    server.store(files)
    wait_for(lambda: server.status()["spoolLength"] == 20, timeout=20, what="20 spooled events")
    server.kill()
    with sqlite3.connect(server.spool_path) as db:
        assert db.execute("SELECT COUNT(*) FROM spool").fetchone()[0] == 20
    sink.start()
    server.start()
    sink.wait_for_events(20, timeout=20)
    _assert_in_order_once(_instance_events(sink), 20)
    wait_for(lambda: server.status()["spoolLength"] == 0, timeout=10, what="an empty spool")


def test_graceful_stop_keeps_queued_events(tmp_path, servers, sink):
    files = write_series(tmp_path / "dcm", 10, patient_id="STOP001")
    sink.stop()
    # A long back-off: the events wait in memory/spool when Orthanc is asked to stop.
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url,
                           plugin_options={"RetryMinDelay": 30, "RetryMaxDelay": 30})
    servers.append(server.start())
    server.store(files)
    wait_for(lambda: server.status()["received"] == 10, timeout=10, what="10 received events")
    assert server.stop() == 0
    sink.start()
    server.start()
    sink.wait_for_events(10, timeout=40)
    _assert_in_order_once(_instance_events(sink), 10)


def test_full_queue_overflows_to_the_spool_in_order(tmp_path, servers, sink):
    files = write_series(tmp_path / "dcm", 40, patient_id="FULL001")
    sink.stop()
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url,
                           plugin_options={"QueueSize": 2, "RetryMinDelay": 1.5, "RetryMaxDelay": 1.5})
    servers.append(server.start())
    server.store(files)
    wait_for(lambda: server.status()["received"] == 40, timeout=10, what="40 received events")
    assert server.status()["overflow"] > 0, "the queue of 2 should have overflowed"
    sink.start()
    sink.wait_for_events(40, timeout=20)
    _assert_in_order_once(_instance_events(sink), 40)


def test_wrong_token_is_refused_counted_kept_and_requeued_on_request(tmp_path, servers):
    sink = EventSink(token="the-scheduler-token").start()
    try:
        files = write_series(tmp_path / "dcm", 12, patient_id="AUTH001")
        server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url, token="a-wrong-token",
                               plugin_options=FAST_RETRY)
        servers.append(server.start())
        server.store(files[:10])
        wait_for(lambda: server.status()["deadLetters"] == 10, timeout=20, what="10 dead letters")
        # One more instance after the first refusals: had the sender retried the refused
        # batches, they would show up again before this one is refused in its turn.
        server.store(files[10:11])
        wait_for(lambda: server.status()["deadLetters"] == 11, timeout=20, what="11 dead letters")
        refused = [e for b in sink.batches if b.status == 401 for e in b.events]
        assert len(refused) == 11, "each event must be posted once, not retried in a loop"
        status = server.status()
        assert status["rejected"] == 11 and status["delivered"] == 0 and status["spoolLength"] == 0
        assert "401" in status["lastError"]
        dead = server.get("/dicomflow/spool/dead")
        assert len(dead) == 11 and {d["status"] for d in dead} == {401}
        assert sorted(int(d["event"]["headers"]["InstanceNumber"]) for d in dead) == list(range(1, 12))

        sink.token = "a-wrong-token"  # the operator fixes the token (here: on the scheduler's side)
        assert server.post("/dicomflow/spool/retry") == {"requeued": 11}
        server.store(files[11:])
        sink.wait_for_events(12, timeout=20)
        _assert_in_order_once(_instance_events(sink), 12)
        assert server.status()["deadLetters"] == 0
        assert server.session.get(server.url + "/dicomflow/spool/retry", timeout=10).status_code == 405
    finally:
        sink.stop()


def test_scheduler_errors_5xx_are_retried_not_buried(tmp_path, servers):
    sink = EventSink(status=503).start()
    try:
        files = write_series(tmp_path / "dcm", 8, patient_id="BUSY001")
        server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url, plugin_options=FAST_RETRY)
        servers.append(server.start())
        server.store(files)
        wait_for(lambda: len([b for b in sink.batches if b.status == 503]) >= 2, timeout=20,
                 what="the 503 batch to be retried")
        assert server.status()["deadLetters"] == 0
        sink.status = 200
        sink.wait_for_events(8, timeout=20)
        _assert_in_order_once(_instance_events(sink), 8)
    finally:
        sink.stop()
