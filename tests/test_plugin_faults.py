"""The plugin's delivery under faults: scheduler down, Orthanc killed, full queue, wrong token."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time


from dicomflow.orthanc_config import STABLE_SCRIPT
from tests.support.orthanc import EventSink, OrthancServer, write_series
from tests.support.orthanc_fixtures import FAST_RETRY
from tests.support.procs import free_port, process_running, wait_for





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
    assert status["delivered"] == 60 and status["spooled"] >= 30 and status["failed"] > 0


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
    # Short batches keep the sender draining while storescu still sends: the callback then
    # queues new items behind a drain and spools the ones after them (a race CI once caught:
    # the spool's head went out before the two queued items).
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url,
                           plugin_options={"QueueSize": 2, "RetryMinDelay": 1.5, "RetryMaxDelay": 1.5,
                                           "MaxBatchDelay": 0.05})
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


def test_events_arriving_during_back_off_are_spooled_at_once(tmp_path, servers, sink):
    files = write_series(tmp_path / "dcm", 10, patient_id="BACK001")
    sink.stop()
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url,
                           plugin_options={"RetryMinDelay": 30, "RetryMaxDelay": 30})
    servers.append(server.start())
    server.store(files[:1])
    wait_for(lambda: server.status()["spoolLength"] == 1, timeout=10, what="the first event spooled")
    # The sender now waits 30 s before its next attempt: what arrives meanwhile goes to disk
    # within a batch delay, not after the 30 s (a crash would lose it from memory).
    server.store(files[1:])
    wait_for(lambda: server.status()["spoolLength"] == 10, timeout=5, what="10 spooled events")
    assert server.status()["queueLength"] == 0


def test_sigkill_with_events_only_in_memory_replays_them_from_orthanc(tmp_path, servers):
    files = write_series(tmp_path / "dcm", 30, patient_id="CRASH01")
    port = free_port()
    # A scheduler that takes the connection and never answers: the first batch stays in
    # flight, the rest in the plugin's memory, nothing reaches the spool.
    black_hole = socket.create_server(("127.0.0.1", port), backlog=16)
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=f"http://127.0.0.1:{port}",
                           plugin_options={"RequestTimeout": 300})
    servers.append(server.start())
    wait_for(lambda: server.status()["checkpoint"] is not None, timeout=10, what="the start's catch-up")
    server.store(files)
    status = server.status()
    assert (status["received"], status["delivered"], status["spoolLength"]) == (30, 0, 0)
    server.kill()
    black_hole.close()
    sink = EventSink(port=port).start()
    try:
        server.start()
        events = sink.wait_for_events(30, timeout=30, level="instance")
        assert sorted(int(e["headers"]["InstanceNumber"]) for e in events) == list(range(1, 31))
        assert all(e["replay"] is True for e in events)
        assert {e["remoteAet"] for e in events} == {"STORESCU"}
        assert {e["calledAet"] for e in events} == {server.aet}
        assert {e["transferSyntax"] for e in events} == {"1.2.840.10008.1.2.1"}
        assert all(e["orthanc"]["instance"] and e["orthanc"]["series"] for e in events)
        status = server.status()
        assert status["replayed"] == 30
        assert status["checkpoint"] == server.get("/changes?last")["Last"]
    finally:
        sink.stop()


def test_the_checkpoint_follows_delivery_so_a_restart_replays_nothing_delivered(tmp_path, servers, sink):
    files = write_series(tmp_path / "dcm", 10, patient_id="CKPT001")
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url,
                           plugin_options={"CheckpointInterval": 0.2, "CallbackGrace": 0.2})
    servers.append(server.start())
    server.store(files)
    sink.wait_for_events(10, level="instance")
    last = server.get("/changes?last")["Last"]
    wait_for(lambda: server.status()["checkpoint"] == last, timeout=10, what=f"the checkpoint at change {last}")
    server.kill()
    server.start()
    wait_for(lambda: server.status()["checkpoint"] == last, timeout=10, what="the catch-up to finish")
    assert server.status()["replayed"] == 0
    assert len(_instance_events(sink)) == 10


def test_the_checkpoint_never_passes_events_still_in_memory(tmp_path, servers, sink):
    files = write_series(tmp_path / "dcm", 40, patient_id="SLOW001")
    # A slow scheduler and small batches: events wait in memory while the sender tries to
    # move the checkpoint every 0.2 s. A checkpoint that ran ahead of delivery would lose them.
    sink.delay = 0.3
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url,
                           plugin_options={"BatchSize": 4, "CheckpointInterval": 0.2, "CallbackGrace": 0.2})
    servers.append(server.start())
    wait_for(lambda: server.status()["checkpoint"] is not None, timeout=10, what="the start's catch-up")
    server.store(files[:8])
    first = server.get("/changes?last")["Last"]
    wait_for(lambda: server.status()["checkpoint"] == first, timeout=20, what="the checkpoint after 8 instances")
    server.store(files[8:])
    time.sleep(1.0)  # five checkpoint intervals
    status = server.status()
    assert status["delivered"] < 40, "the slow sink should still be behind"
    assert status["checkpoint"] == first, "the checkpoint passed events not yet delivered"
    server.kill()
    sink.delay = 0.0
    server.start()
    wait_for(lambda: {int(e["headers"]["InstanceNumber"]) for e in _instance_events(sink)} == set(range(1, 41)),
             timeout=30, what="every instance delivered")
    status = server.status()
    assert status["replayed"] > 0
    replayed = {int(e["headers"]["InstanceNumber"]) for e in _instance_events(sink) if e.get("replay")}
    assert len(replayed) == status["replayed"] and min(replayed) > 8


def test_the_builder_process_is_started_before_the_first_instance(tmp_path, servers, sink):
    # Started at the first batch, its start and imports (~140 ms) delayed the first study's
    # events after every Orthanc start (issue 23's cold start).
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url)
    servers.append(server.start())
    wait_for(lambda: server.status()["builder"] == "process", timeout=10,
             what="the builder process, before any instance")
    status = server.status()
    assert status["received"] == 0 and process_running(status["builderPid"])
    server.store(write_series(tmp_path / "dcm", 3, patient_id="EARLY01"))
    _assert_in_order_once(sink.wait_for_events(3, level="instance"), 3)
    after = server.status()
    assert (after["builderPid"], after["builtInPlugin"], after["builderFailures"]) == (status["builderPid"], 0, 0)


def test_a_builder_process_that_dies_loses_nothing_and_is_replaced(tmp_path, servers, sink):
    files = write_series(tmp_path / "dcm", 60, patient_id="BUILD01")
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url, plugin_options=FAST_RETRY)
    servers.append(server.start())
    server.store(files[:10])
    sink.wait_for_events(10, level="instance")
    first = server.status()["builderPid"]
    assert first and process_running(first)
    os.kill(first, signal.SIGKILL)
    server.store(files[10:])
    events = sink.wait_for_events(60, level="instance")
    _assert_in_order_once(events, 60)
    status = server.status()
    assert status["builderFailures"] == 1, status
    assert status["builtInPlugin"] > 0, "the batch the dead process held should be built in the plugin"
    # RetryMaxDelay later, the next batch starts a new process.
    more = write_series(tmp_path / "more", 5, patient_id="BUILD02")
    time.sleep(0.6)
    server.store(more)
    sink.wait_for_events(65, level="instance")
    status = server.status()
    assert status["builder"] == "process" and status["builderPid"] not in (None, first)


def test_a_builder_process_that_dies_while_it_delivers_loses_nothing(tmp_path, servers, sink):
    """The builder process POSTs the batches it builds; killed while the scheduler has not
    answered yet, whether the batch was taken is unknown: the plugin builds it again and
    sends it itself (the scheduler plans an event it already has only once)."""
    files = write_series(tmp_path / "dcm", 20, patient_id="BUILD03")
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url, plugin_options=FAST_RETRY)
    servers.append(server.start())
    server.store(files[:10])
    sink.wait_for_events(10, level="instance")
    builder, batches = server.status()["builderPid"], server.status()["batches"]
    sink.delay = 3.0  # the next POST waits for its answer
    server.store(files[10:])
    wait_for(lambda: server.status()["batches"] > batches, timeout=10, what="the next batch handed over")
    os.kill(builder, signal.SIGKILL)

    def numbers() -> set[int]:
        return {int(e["headers"]["InstanceNumber"]) for e in sink.delivered() if e["level"] == "instance"}
    wait_for(lambda: numbers() == set(range(1, 21)), timeout=30, what="every instance delivered")
    status = server.status()
    assert status["builderFailures"] == 1, status
    assert status["builtInPlugin"] > 0, "the batch the dead process held should be built in the plugin"
    assert status["spooled"] == 0 and status["failed"] == 0, status


def test_without_a_python_for_the_builder_events_are_built_in_orthanc(tmp_path, servers, sink):
    files = write_series(tmp_path / "dcm", 20, patient_id="NOPY001")
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url,
                           plugin_options={"BuilderPython": str(tmp_path / "no-such-python")})
    servers.append(server.start())
    server.store(files)
    _assert_in_order_once(sink.wait_for_events(20, level="instance"), 20)
    status = server.status()
    assert status["builder"].startswith("failed: cannot start"), status["builder"]
    assert "no-such-python" in status["lastError"]
    assert status["builtInPlugin"] == 20 and status["builderFailures"] == 1


def test_the_builder_process_ends_with_orthanc_even_killed(tmp_path, servers, sink):
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url)
    servers.append(server.start())
    server.store(write_series(tmp_path / "dcm", 3, patient_id="ORPHAN1"))
    sink.wait_for_events(3, level="instance")
    pid = server.status()["builderPid"]
    assert pid and process_running(pid)
    server.kill()
    wait_for(lambda: not process_running(pid), timeout=10, what=f"the builder process {pid} to exit")


#: Loaded before dicomflow_stable.lua: holds Orthanc's Lua queue for 1 s of Orthanc's CPU time
#: per stored instance (os.clock: at least 0.5 s of wall time on two cores), so the Lua engine
#: reaches a series' stable change long after Orthanc logged it. (It also holds Orthanc's HTTP
#: server, which asks Lua about each request: the test looks at the sink and the spool meanwhile.)
SLOW_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  local started = os.clock()
  while os.clock() - started < 1.0 do end
end
"""


def _spool_state(server: OrthancServer) -> dict[str, int]:
    with sqlite3.connect(server.spool_path) as db:
        return {key: int(value) for key, value in db.execute("SELECT key, value FROM state")}


def test_a_stable_series_the_lua_engine_had_not_reached_at_a_sigkill_is_read_back(tmp_path, servers, sink):
    slow = tmp_path / "slow.lua"
    slow.write_text(SLOW_LUA)
    files = write_series(tmp_path / "dcm", 20, patient_id="LUALAG1")
    server = OrthancServer(tmp_path / "orthanc", scheduler_url=sink.url, stable_age=1,
                           plugin_options={"CheckpointInterval": 0.2, "CallbackGrace": 0.2, "StableGrace": 600},
                           extra={"LuaScripts": [str(slow), str(STABLE_SCRIPT)]})
    servers.append(server.start())
    assert server.status()["stableEvents"] == "lua"
    wait_for(lambda: server.status()["checkpoint"] is not None, timeout=10, what="the start's catch-up")
    server.store(files)
    sink.wait_for_events(20, level="instance")
    # Orthanc logs the series stable ~1-2 s after its last instance and the checkpoint passes
    # that change (past the ingest's own changes: each instance's, its series', study's and
    # patient's); the Lua engine is still ~10 s of OnStoredInstance behind it.
    ingest_changes = len(files) + 3
    wait_for(lambda: _spool_state(server).get("checkpoint", 0) > ingest_changes, timeout=12,
             what="the checkpoint past the stable change")
    assert not [e for e in sink.delivered() if e["level"] != "instance"], "the Lua engine was not held up"
    before = _spool_state(server)
    server.kill()
    server.start()
    stable_seq = next(c["Seq"] for c in server.get("/changes?limit=1000")["Changes"]
                      if c["ChangeType"] == "StableSeries")
    # What happened before the kill: a checkpoint past the stable change, whose event was
    # never queued; the stable checkpoint (StableGrace behind) below it.
    assert before["checkpoint"] >= stable_seq > before["stableCheckpoint"]
    [event] = sink.wait_for_events(1, timeout=30, level="series")
    series = server.get(f"/series/{event['orthanc']['series']}")
    assert sorted(event["orthanc"]["instances"]) == sorted(series["Instances"]) and len(series["Instances"]) == 20
    assert sink.wait_for_events(1, timeout=30, level="study")
    assert server.status()["replayed"] == 0  # the instances were delivered: only the series and study are read back
