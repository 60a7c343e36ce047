"""Parallel chunked retrieval of one large instance to a file: N connections, bounded memory.

Each of `connections` tasks takes the next chunk index, GETs it and writes it at its offset
(`os.pwrite`), so at most `connections` chunks are in memory whatever the file's size. The
file is written beside the target and renamed into place once complete (and verified).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from dicomflow.redisstore.errors import IntegrityError, NotFoundError, RedisStoreError
from dicomflow.redisstore.keys import StoreKeys


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


async def fetch_to_file(url: str, sop: str, out: str, *, prefix: str = "dicom:", connections: int = 8,
                        verify: bool = True) -> FetchResult:
    """Write the stored bytes of `sop` to `out` with `connections` parallel connections.

    Raises:
        NotFoundError: not stored.
        IntegrityError: size or SHA-256 differ (the partial file is removed).
        RedisStoreError: the instance was replaced or deleted while read.
    """
    keys = StoreKeys(prefix)
    pool = aioredis.ConnectionPool.from_url(url, max_connections=connections)
    client = aioredis.Redis(connection_pool=pool)
    tmp = f"{out}.part-{os.getpid()}"
    try:
        raw = await client.hgetall(keys.doc(sop))
        if not raw:
            raise NotFoundError(f"no stored instance with SOPInstanceUID {sop}")
        doc = {k.decode(): v.decode() for k, v in raw.items()}
        version, count, size = doc["version"], int(doc["chunks"]), int(doc["size"])
        chunk_size = int(doc["chunk_size"])
        start = time.perf_counter()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            indexes = iter(range(count))

            async def worker() -> None:
                for index in indexes:  # one shared iterator: each index is taken once
                    value = await client.get(keys.chunk(sop, version, index))
                    if value is None:
                        raise RedisStoreError(f"{sop}: replaced or deleted while read (chunk {index})")
                    os.pwrite(fd, value, index * chunk_size)

            await asyncio.gather(*(worker() for _ in range(max(1, min(connections, count or 1)))))
        finally:
            os.close(fd)
        seconds = time.perf_counter() - start
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
        await client.aclose()
        await pool.aclose()


def fetch(url: str, sop: str, out: str, **options) -> FetchResult:
    """`fetch_to_file` from synchronous code."""
    return asyncio.run(fetch_to_file(url, sop, out, **options))
