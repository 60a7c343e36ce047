"""LONK progress messages through a real nats-server, and the Redis token bucket."""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import nats
import pydicom
import pytest
import redis

from dicomflow.chris.client import ChrisClient
from dicomflow.chris.jobs import finish_series, store_instance
from dicomflow.chris.lonk import LonkNotifier, lonk_subject
from dicomflow.chris.ratelimit import current_rate, limiter, set_rate
from dicomflow.chris.settings import ChrisSettings
from tests.support.chris_env import SAG_SERIES_UID, chris_config, instance_event, orthanc_id, series_event
from tests.support.procs import free_port, wait_for


SUBJECT = "oxidicom.OXITESTORTHANC.1_3_12_2_1107_5_2_19_45152_2013030808061520200285270_0_0_0"


@pytest.fixture()
def nats_url(tmp_path):
    """A real nats-server of this test on a free port."""
    exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if not Path(exe).exists():
        pytest.skip("nats-server is not installed")
    port = free_port()
    proc = subprocess.Popen([exe, "-a", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    import socket

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, timeout=10, what="nats-server")
    yield f"nats://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


class Subscriber:
    """Collects the messages of `subject` in a background thread with its own event loop."""

    def __init__(self, url: str, subject: str):
        self.messages: list[tuple[str, bytes]] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run(url, subject)), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _run(self, url: str, subject: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        client = await nats.connect(url)

        async def collect(msg) -> None:
            self.messages.append((msg.subject, msg.data))

        await client.subscribe(subject, cb=collect)
        await client.flush()
        self._ready.set()
        await self._stop.wait()
        await client.close()

    def close(self) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_subject_and_encoding():
    assert lonk_subject("OXITESTORTHANC", SAG_SERIES_UID) == SUBJECT
    assert lonk_subject("A B*C>D", "1.2\x00") == "oxidicom.A_B_C_D.1_2"


def test_lonk_messages_from_a_series_in_byte_format(nats_url, connection, make_cube, sag_anon, tmp_path):
    cube = make_cube("cube7")
    settings = ChrisSettings.from_config(chris_config(cube, NATS_URL=nats_url, CHRIS_PROGRESS_INTERVAL="0"))
    files = sorted(sag_anon.glob("*.dcm"))[:20]
    broken = tmp_path / "broken.dcm"
    ds = pydicom.dcmread(files[5])
    del ds.StudyDate
    ds.save_as(broken)
    subscriber = Subscriber(nats_url, "oxidicom.>")
    try:
        for path in files:
            if path == files[5]:
                with pytest.raises(Exception, match="StudyDate"):
                    store_instance(settings, connection, broken, instance_event(orthanc_id(path)))
            else:
                store_instance(settings, connection, path, instance_event(orthanc_id(path)))
        finish_series(settings, connection, tmp_path, series_event([orthanc_id(p) for p in files]),
                      SAG_SERIES_UID)
        wait_for(lambda: any(m[1] == b"\x00" for m in subscriber.messages), timeout=10, what="LONK done")
    finally:
        subscriber.close()
    subjects = {s for s, _ in subscriber.messages}
    payloads = [m for _, m in subscriber.messages]
    assert subjects == {SUBJECT}
    progress = [struct.unpack("<I", p[1:])[0] for p in payloads if p[0] == 0x01]
    assert all(len(p) == 5 for p in payloads if p[0] == 0x01)
    stored = len(files) - 1  # 19 (16 files in a fresh clone: 15)
    assert progress == list(range(1, stored + 1)) + [stored]  # each stored instance, then the final count
    errors = [p[1:].decode() for p in payloads if p[0] == 0x02]
    assert any("StudyDate" in e for e in errors)
    assert payloads[-1] == b"\x00"


def test_progress_messages_are_throttled(nats_url, connection):
    subscriber = Subscriber(nats_url, "oxidicom.>")
    try:
        for n in range(50):
            notifier = LonkNotifier(nats_url, connection, interval=10)
            notifier.progress("P", "1.2", n)
            notifier.flush()
        notifier = LonkNotifier(nats_url, connection, interval=10)
        notifier.done("P", "1.2")
        notifier.flush()
        wait_for(lambda: any(m[1] == b"\x00" for m in subscriber.messages), timeout=10, what="done")
    finally:
        subscriber.close()
    assert [m for _, m in subscriber.messages] == [b"\x01\x00\x00\x00\x00", b"\x00"]


def test_nats_down_does_not_fail_the_job(connection):
    notifier = LonkNotifier(f"nats://127.0.0.1:{free_port()}", connection, interval=0, timeout=0.5)
    notifier.done("P", "1.2")
    assert notifier.flush() is False


def _burst(redis_url: str, count: int, rate: float, burst: float) -> list[float]:
    """Take `count` tokens from 4 threads (separate connections, as separate workers); the times."""
    times: list[float] = []
    lock = threading.Lock()

    def take(n: int) -> None:
        bucket = limiter(redis.Redis.from_url(redis_url), rate, burst)
        for _ in range(n):
            bucket.acquire()
            with lock:
                times.append(time.monotonic())

    threads = [threading.Thread(target=take, args=(count // 4,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(times)


def test_token_bucket_caps_a_burst_across_workers(redis_url, connection):
    start = time.monotonic()
    times = _burst(redis_url, 80, rate=40, burst=0.25)
    elapsed = times[-1] - start
    # 10 tokens at once (40/s x 0.25 s), then 40/s: 70 more need >= 1.75 s.
    assert 1.6 < elapsed < 3.0
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u - t < 0.5) <= 10 + 20 + 1


def test_rate_is_adjustable_at_run_time(redis_url, connection):
    set_rate(connection, 0)  # off, although configured at 5/s
    start = time.monotonic()
    _burst(redis_url, 200, rate=5, burst=1)
    assert time.monotonic() - start < 1.0
    assert current_rate(connection, 5) == 0
    set_rate(connection, 20)
    start = time.monotonic()
    _burst(redis_url, 40, rate=1000, burst=0.05)  # the run-time 20/s wins over the configured 1000/s
    assert time.monotonic() - start > 1.5
    set_rate(connection, None)
    assert current_rate(connection, 5) == 5


def test_the_client_respects_the_rate_limit(connection, make_cube):
    cube = make_cube("cube5")
    settings = ChrisSettings.from_config(chris_config(cube, CHRIS_RATE_LIMIT="25", CHRIS_RATE_BURST="0.1"))
    with ChrisClient(settings, connection) as client:
        client.token()
        start = time.monotonic()
        for _ in range(30):
            assert client.request("GET", "pacsfiles/").status_code == 200
        assert time.monotonic() - start > 1.0  # (30 - 2.5) / 25 s
