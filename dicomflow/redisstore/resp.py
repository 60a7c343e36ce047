"""Read chunk values from Redis straight into the caller's buffers: one socket, RESP bulk replies, no copy per reply.

redis-py (with hiredis) receives a reply in 64 KiB reads, copies them into hiredis's buffer and
then into a new `bytes` per value: for scenario 2 of issue 18 (19 files of 232 KB in one MGET)
that took twice as long as receiving the same reply into a preallocated buffer
(bench/redisstore.py). This connection does only what the store's readers need: send commands,
and receive an array of bulk strings (MGET) or one bulk string (GET) into given memoryviews.
Everything else (scripts, documents, writes) stays with redis-py.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote, urlparse

import redis

from dicomflow.redisstore.errors import RedisStoreError


class ProtocolError(RedisStoreError):
    """Redis answered something the chunk reader did not ask for (an error reply, a closed connection)."""


def command(*args: str | bytes) -> bytes:
    """One command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class BulkConnection:
    """One blocking socket to Redis whose bulk replies are received into buffers the caller gives."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.carry = bytearray()  # received past the reply read so far
        self.skip = 0  # the CRLF after a bulk value, consumed before the next line

    @classmethod
    def connect(cls, address: tuple[str, int] | str, *, db: int = 0, username: str | None = None,
                password: str | None = None, timeout: float | None = None) -> BulkConnection:
        """Connect to a TCP ``(host, port)`` or a unix socket path, authenticate and select `db`."""
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(timeout)
            sock.connect(address)
        else:
            sock = socket.create_connection(address, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(sock)
        try:
            hello = b""
            if password:
                hello += command("AUTH", *([username] if username else []), password)
            hello += command("SELECT", str(db))
            sock.sendall(hello)
            for _ in range(2 if password else 1):
                conn.simple()
        except BaseException:
            sock.close()
            raise
        return conn

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while True:
            if self.skip and len(self.carry) >= self.skip:
                del self.carry[:self.skip]
                self.skip = 0
            end = self.carry.find(b"\r\n") if not self.skip else -1
            if end >= 0:
                line = bytes(self.carry[:end])
                del self.carry[:end + 2]
                return line
            more = self.sock.recv(4096)
            if not more:
                raise ProtocolError("the store's Redis closed the connection")
            self.carry += more

    def _header(self, kind: bytes) -> int:
        line = self._line()
        if line[:1] == b"-":
            raise ProtocolError(f"the store's Redis answered: {line[1:].decode(errors='replace')}")
        if line[:1] != kind:
            raise ProtocolError(f"expected a {kind!r} reply, got {line[:40]!r}")
        return int(line[1:])

    def simple(self) -> bytes:
        """A status reply (``+OK``)."""
        line = self._line()
        if line[:1] == b"-":
            raise ProtocolError(f"the store's Redis answered: {line[1:].decode(errors='replace')}")
        return line[1:]

    def array(self) -> int:
        """The length of an array reply (its items are read next)."""
        return self._header(b"*")

    def bulk_into(self, view: memoryview) -> int | None:
        """Receive one bulk string into `view`: its length, or None for a nil.

        Raises:
            ProtocolError: the value is longer than `view` (the connection is then unusable: close it).
        """
        size = self._header(b"$")
        if size < 0:
            return None
        if size > len(view):
            raise ProtocolError(f"a value of {size} bytes where at most {len(view)} were expected")
        have = min(len(self.carry), size)
        if have:
            view[:have] = self.carry[:have]
            del self.carry[:have]
        while have < size:
            got = self.sock.recv_into(view[have:size])
            if not got:
                raise ProtocolError("the store's Redis closed the connection")
            have += got
        self.skip = 2
        return size

    def close(self) -> None:
        self.sock.close()


class BulkPool:
    """Bulk connections to one Redis, reused by one thread at a time each."""

    def __init__(self, address: tuple[str, int] | str, *, db: int = 0, username: str | None = None,
                 password: str | None = None, timeout: float | None = None):
        self._connect = lambda: BulkConnection.connect(address, db=db, username=username, password=password,
                                                       timeout=timeout)
        self._idle: list[BulkConnection] = []
        self._lock = threading.Lock()

    @classmethod
    def for_client(cls, client: redis.Redis) -> BulkPool | None:
        """A pool to the server `client` talks to; None for TLS (or any connection class but TCP and unix)."""
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        options = {"db": int(kwargs.get("db") or 0), "username": kwargs.get("username"),
                   "password": kwargs.get("password"), "timeout": kwargs.get("socket_timeout")}
        if pool.connection_class is redis.Connection:
            return cls((kwargs.get("host") or "localhost", int(kwargs.get("port") or 6379)), **options)
        if pool.connection_class is redis.UnixDomainSocketConnection:
            return cls(kwargs["path"], **options)
        return None

    @classmethod
    def from_url(cls, url: str) -> BulkPool | None:
        """A pool for a ``redis://`` or ``unix://`` URL (None for ``rediss://``)."""
        parts = urlparse(url)
        if parts.scheme not in ("redis", "unix"):
            return None
        return cls.for_client(redis.Redis.from_url(url)) if parts.scheme == "unix" else cls(
            (parts.hostname or "localhost", parts.port or 6379), db=int((parts.path or "/0").strip("/") or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None)

    @contextmanager
    def connection(self) -> Iterator[BulkConnection]:
        """An idle connection (or a new one); closed instead of reused when the caller raised."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect()
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
