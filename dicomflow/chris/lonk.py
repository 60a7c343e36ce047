"""Progress messages per series in oxidicom's LONK encoding, published to NATS (cube.md section 3)."""

from __future__ import annotations

import asyncio
import logging
import struct

import nats
import nats.errors
import redis

from dicomflow.keys import service_key

log = logging.getLogger(__name__)

PROGRESS = 0x01
DONE = 0x00
ERROR = 0x02
_THROTTLE = service_key("chris") + "lonk-throttle:"


def _subject_part(text: str) -> str:
    """A subject token as oxidicom writes it: NUL dropped; space . * > become `_`."""
    for char in " .*>":
        text = text.replace(char, "_")
    return text.replace("\x00", "")


def lonk_subject(pacs_name: str, series_uid: str) -> str:
    """`oxidicom.{pacs}.{SeriesInstanceUID}`, each part sanitised."""
    return f"oxidicom.{_subject_part(pacs_name)}.{_subject_part(series_uid)}"


def progress_message(ndicom: int) -> bytes:
    """`0x01` + little-endian u32: instances stored so far."""
    return bytes([PROGRESS]) + struct.pack("<I", ndicom & 0xFFFFFFFF)


def done_message() -> bytes:
    """`0x00`: the series is done."""
    return bytes([DONE])


def error_message(text: str) -> bytes:
    """`0x02` + UTF-8 text."""
    return bytes([ERROR]) + text.encode("utf-8")


class LonkNotifier:
    """Collects one job's LONK messages and publishes them over one NATS connection on `flush()`.

    Without a NATS URL every call is a no-op. Progress messages are throttled per subject
    across all workers through a Redis key; done and error messages always go out.
    """

    def __init__(self, nats_url: str, connection: redis.Redis, interval: float = 0.5,
                 timeout: float = 2.0):
        self._url = nats_url
        self._connection = connection
        self._interval_ms = int(interval * 1000)
        self._timeout = timeout
        self._pending: list[tuple[str, bytes]] = []

    @property
    def enabled(self) -> bool:
        return bool(self._url)

    def progress(self, pacs_name: str, series_uid: str, ndicom: int, force: bool = False) -> None:
        """Queue an ndicom message unless one went out for this series within the interval."""
        if not self.enabled:
            return
        subject = lonk_subject(pacs_name, series_uid)
        if (not force and self._interval_ms > 0
                and not self._connection.set(_THROTTLE + subject, b"1", nx=True, px=self._interval_ms)):
            return
        self._pending.append((subject, progress_message(ndicom)))

    def done(self, pacs_name: str, series_uid: str) -> None:
        """Queue the done message of a series."""
        if self.enabled:
            self._pending.append((lonk_subject(pacs_name, series_uid), done_message()))

    def error(self, pacs_name: str, series_uid: str, text: str) -> None:
        """Queue an error message of a series."""
        if self.enabled:
            self._pending.append((lonk_subject(pacs_name, series_uid), error_message(text)))

    def flush(self) -> bool:
        """Publish what is queued; False (and a warning) when NATS cannot be reached."""
        if not self._pending:
            return True
        pending, self._pending = self._pending, []
        try:
            asyncio.run(asyncio.wait_for(self._publish(pending), timeout=4 * self._timeout))
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            # Progress messages are advisory: a NATS outage must not fail the store itself.
            log.warning("LONK: could not publish %d message(s) to %s: %s", len(pending), self._url, exc)
            return False
        return True

    async def _publish(self, pending: list[tuple[str, bytes]]) -> None:
        async def quiet(_exc: Exception) -> None:
            return None

        # max_reconnect_attempts=0 would make nats-py retry an unreachable server forever.
        client = await nats.connect(self._url, connect_timeout=self._timeout, allow_reconnect=False,
                                    max_reconnect_attempts=1, reconnect_time_wait=0.1, error_cb=quiet)
        try:
            for subject, payload in pending:
                await client.publish(subject, payload)
            await client.flush(timeout=self._timeout)
        finally:
            await client.close()
