"""Parallel chunked retrieval of one large instance to a file: N connections, bounded memory.

Each of `connections` asyncio tasks takes the next chunk indexes, GETs them (`depth` in flight,
refilled half a window at a time in one send) and writes each at its offset (`os.pwrite`). The
process holds one chunk per connection whatever the file's size (the replies in flight wait in
the kernel's socket buffers). The file is written beside the target and renamed into place once
complete (and verified).

For ``redis://`` URLs the tasks speak RESP on their own sockets and receive each chunk straight
into a per-connection buffer (`loop.sock_recv_into`): through redis-py's asyncio client (with
hiredis) the same transfer ran at a quarter of the speed (bench/redisstore.py; its parser copies
every reply, in 64 KiB reads). ``rediss://`` and ``unix://`` go through redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import os
import socket
import stat
import time
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

import redis.asyncio as aioredis

from dicomflow.redisstore.errors import IntegrityError, NotFoundError, RedisStoreError
from dicomflow.redisstore.keys import StoreKeys


#: GETs in flight per connection when not given: this many bytes' worth of chunks, at least 2 (the
#: values wait in the kernel's socket buffer, not in this process: its memory stays one chunk a connection).
PIPELINE_BYTES = 1 << 20


@dataclass(frozen=True)
class FetchResult:
    """One retrieval: where, how big, how long (s), and whether the SHA-256 was checked."""

    path: str
    size: int
    seconds: float
    verified: bool

    @property
    def mb_per_s(self) -> float:
        return self.size / 1e6 / self.seconds if self.seconds else 0.0


def _command(*args: str | bytes) -> bytes:
    """One command in RESP."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        arg = arg if isinstance(arg, bytes) else arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class _RawConnection:
    """One socket to Redis that reads bulk replies into its own buffer (no copy per reply)."""

    def __init__(self, sock: socket.socket, size: int):
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.view = memoryview(bytearray(size + 2))
        self.carry = b""  # bytes received past the previous reply

    @classmethod
    async def open(cls, url: str, size: int) -> _RawConnection:
        parts = urlparse(url)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET)
        sock.setblocking(False)
        await loop.sock_connect(sock, (parts.hostname or "127.0.0.1", parts.port or 6379))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = cls(sock, size)
        hello = b""
        if parts.password:
            user = [unquote(parts.username)] if parts.username else []
            hello += _command("AUTH", *user, unquote(parts.password))
        hello += _command("SELECT", (parts.path or "/0").strip("/") or "0")
        await loop.sock_sendall(sock, hello)
        for _ in range(2 if parts.password else 1):
            await conn.reply()
        return conn

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def reply(self) -> int | None:
        """Read one reply: a bulk string's length (its bytes in `view`), None for a nil; raises on an error."""
        data = self.carry
        while b"\r\n" not in data:
            more = await self.loop.sock_recv(self.sock, 256)
            if not more:
                raise RedisStoreError("the store's Redis closed the connection")
            data += more
        line, _, rest = data.partition(b"\r\n")
        if line[:1] == b"-":
            raise RedisStoreError(f"the store's Redis answered: {line[1:].decode(errors='replace')}")
        if line[:1] != b"$" or int(line[1:]) < 0:
            self.carry = rest
            return None if line[:1] == b"$" else 0
        need = int(line[1:]) + 2
        have = min(len(rest), need)
        self.view[:have] = rest[:have]
        self.carry = rest[have:]
        while have < need:
            got = await self.loop.sock_recv_into(self.sock, self.view[have:need])
            if not got:
                raise RedisStoreError("the store's Redis closed the connection")
            have += got
        return need - 2

    def close(self) -> None:
        self.sock.close()


async def _raw_transfer(url: str, keys: StoreKeys, sop: str, version: str, count: int, chunk_size: int, fd: int,
                        connections: int, depth: int | None) -> None:
    indexes = iter(range(count))
    depth = depth or max(2, PIPELINE_BYTES // chunk_size)

    async def worker() -> None:
        conn = await _RawConnection.open(url, chunk_size)
        try:
            inflight: collections.deque[int] = collections.deque()
            while True:
                if len(inflight) <= depth // 2:  # refill in one send, not one GET a syscall
                    # one shared iterator: each index is taken once
                    more = list(itertools.islice(indexes, depth - len(inflight)))
                    if more:
                        await conn.send(b"".join(_command("GET", keys.chunk(sop, version, i)) for i in more))
                        inflight.extend(more)
                if not inflight:
                    return
                index = inflight.popleft()
                size = await conn.reply()
                if size is None:
                    raise RedisStoreError(f"{sop}: replaced or deleted while read (chunk {index})")
                os.pwrite(fd, conn.view[:size], index * chunk_size)
        finally:
            conn.close()
    await asyncio.gather(*(worker() for _ in range(max(1, min(connections, count or 1)))))


async def transfer(url: str, sop: str, fd: int, *, prefix: str = "dicom:", connections: int = 4,
                   depth: int | None = None, raw: bool | None = None) -> dict[str, str]:
    """Write the stored bytes of `sop` into the open file `fd`, each chunk at its offset, with `connections`
    parallel connections (`depth` GETs in flight on each).

    `raw`: our own RESP sockets (default for ``redis://``), or redis-py's asyncio client.

    Returns:
        The instance's document (its size and SHA-256 to check the file against).

    Raises:
        NotFoundError: not stored.
        RedisStoreError: the instance was replaced or deleted while read.
    """
    keys = StoreKeys(prefix)
    pool = aioredis.ConnectionPool.from_url(url, max_connections=connections)
    client = aioredis.Redis(connection_pool=pool)
    try:
        found = await client.hgetall(keys.doc(sop))
        if not found:
            raise NotFoundError(f"no stored instance with SOPInstanceUID {sop}")
        doc = {k.decode(): v.decode() for k, v in found.items()}
        version, count, chunk_size = doc["version"], int(doc["chunks"]), int(doc["chunk_size"])
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, int(doc["size"]))
        if url.startswith("redis://") if raw is None else raw:
            await _raw_transfer(url, keys, sop, version, count, chunk_size, fd, connections, depth)
        else:
            await _pooled_transfer(client, keys, sop, version, count, chunk_size, fd, connections)
        return doc
    finally:
        await client.aclose()
        await pool.aclose()


async def fetch_to_file(url: str, sop: str, out: str, *, prefix: str = "dicom:", connections: int = 4,
                        depth: int | None = None, verify: bool = True, raw: bool | None = None) -> FetchResult:
    """Write the stored bytes of `sop` to `out` with `connections` parallel connections (see `transfer`).

    Raises:
        NotFoundError: not stored.
        IntegrityError: size or SHA-256 differ (the partial file is removed).
        RedisStoreError: the instance was replaced or deleted while read.
    """
    tmp = f"{out}.part-{os.getpid()}"
    try:
        start = time.perf_counter()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            doc = await transfer(url, sop, fd, prefix=prefix, connections=connections, depth=depth, raw=raw)
        finally:
            os.close(fd)
        seconds = time.perf_counter() - start
        size = int(doc["size"])
        if verify:
            digest = hashlib.sha256()
            with open(tmp, "rb") as file:
                while block := file.read(1 << 20):
                    digest.update(block)
            if digest.hexdigest() != doc["sha256"] or os.path.getsize(tmp) != size:
                raise IntegrityError(f"{sop}: the bytes read back do not match the stored SHA-256")
        os.replace(tmp, out)
        return FetchResult(out, size, seconds, verify)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


async def _pooled_transfer(client: aioredis.Redis, keys: StoreKeys, sop: str, version: str, count: int,
                           chunk_size: int, fd: int, connections: int) -> None:
    """The same transfer through redis-py's asyncio client (TLS, unix sockets)."""
    indexes = iter(range(count))

    async def worker() -> None:
        for index in indexes:  # one shared iterator: each index is taken once
            value = await client.get(keys.chunk(sop, version, index))
            if value is None:
                raise RedisStoreError(f"{sop}: replaced or deleted while read (chunk {index})")
            os.pwrite(fd, value, index * chunk_size)
    await asyncio.gather(*(worker() for _ in range(max(1, min(connections, count or 1)))))


def fetch(url: str, sop: str, out: str, **options) -> FetchResult:
    """`fetch_to_file` from synchronous code."""
    return asyncio.run(fetch_to_file(url, sop, out, **options))
