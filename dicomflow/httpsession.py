"""HTTP keep-alive without the delayed-ACK stall.

A server that leaves Nagle's algorithm on and writes an answer in several sends (CUBE 5's
Django `runserver` writes the status line, the headers and the body apart) holds each later
piece until the client ACKs the first; a Linux client on a keep-alive connection delays that
ACK by ~40 ms, so every answer after a connection's first takes 40 ms more (issue 23 measured
it against real CUBE 5: 13 ms to the first byte, 56 ms in all). A new connection per request
avoids it (Linux ACKs a new connection's first segments at once) but pays a handshake, and on
CUBE's side a database connection, every time.

`session()` keeps the connection and asks the kernel for an immediate ACK (`TCP_QUICKACK`)
right before each answer is read: the flag is not sticky, so it is set for every request.
Elsewhere than Linux, a plain keep-alive session.
"""

from __future__ import annotations

import socket
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class _AckAtOnce:
    """Sets TCP_QUICKACK on the connection's socket before its answer is read."""

    sock: socket.socket | None

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        if QUICKACK is not None and self.sock is not None:
            try:
                self.sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            except OSError:   # a socket that no longer takes options still answers as before
                pass
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


class QuickAckHTTPConnection(_AckAtOnce, HTTPConnection):
    pass


class QuickAckHTTPSConnection(_AckAtOnce, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = QuickAckHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = QuickAckHTTPSConnection


class QuickAckAdapter(HTTPAdapter):
    """requests' adapter whose pools make `QuickAck*Connection`s (this adapter's pools only)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}


def session() -> requests.Session:
    """A `requests.Session` whose keep-alive connections do not stall on delayed ACKs."""
    result = requests.Session()
    adapter = QuickAckAdapter()
    result.mount("http://", adapter)
    result.mount("https://", adapter)
    return result
