"""Delivery of event batches to the scheduler: one keep-alive HTTP connection, Nagle off.

Used by the plugin's sender thread (spooled batches, and every batch when there is no
builder process) and by the builder process (the batches it built). Standard library only.
"""

from __future__ import annotations

import http.client
import socket
import urllib.parse


class DeliveryError(Exception):
    """The scheduler could not be reached or answered with a transient error."""


class Delivery:
    """POSTs ``{"events": [...]}`` bodies to the scheduler's event intake with a bearer token.

    Args:
        url: the scheduler's base URL (or the intake's own URL).
        token: the bearer token.
        events_path: the intake's path below `url`.
        connect_timeout, request_timeout: seconds.
    """

    def __init__(self, url: str, token: str, events_path: str, connect_timeout: float, request_timeout: float):
        parts = urllib.parse.urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        base = parts.path.rstrip("/")
        self._path = base if base.endswith(events_path) else base + events_path
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        self._connect_timeout = connect_timeout
        self._request_timeout = request_timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = kind(self._host, self._port, timeout=self._connect_timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock.settimeout(self._request_timeout)
        return conn

    def post(self, body: bytes) -> tuple[int, bytes]:
        """POST one batch; returns (status, body).

        Raises:
            DeliveryError: connection refused/reset, timeout, or a broken answer.
        """
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            fresh = self._conn is None
            try:
                if self._conn is None:
                    self._conn = self._connect()
                self._conn.request("POST", self._path, body=body, headers=self._headers)
                answer = self._conn.getresponse()
                data = answer.read()
                if answer.will_close:
                    self.close()
                return answer.status, data
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if fresh or attempt == 2 or isinstance(exc, TimeoutError):
                    raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Drop the connection (the next post opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def batch_body(texts: list[str]) -> bytes:
    """The request body of a batch of event JSON texts."""
    return ('{"events":[' + ",".join(texts) + "]}").encode("utf-8")
