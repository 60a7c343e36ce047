"""What counting one instance in its series' progress record costs a ChRIS worker.

Every instance the ChRIS service stores and registers updates its series' record twice
(dicomflow/chris/progress.py: `stored`, then `registered`). The record is now changed by one
Lua script per step; before, by a MULTI/EXEC of ~17 commands per step, kept here as the
reference (`multi_*` below: the same keys and values). Both run in turn, in one process,
against a private redis-server; printed per instance: wall time, the client's CPU (what a
worker pays) and redis-server's CPU, median of the rounds, and script / MULTI.

    .venv/bin/python -m bench.chris_progress --instances 3000 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import redis

from bench.support import private_redis
from dicomflow.chris.progress import (
    INDEX_KEY,
    INDEX_LENGTH,
    PROGRESS_TTL,
    SeriesProgress,
    SeriesState,
    _senders_key,
    new_attempt_id,
)

FOLDER = "SERVICES/PACS/PACS1/1449c1d-anonymized-20090701/MR-Brain-98edede8b2-20130308/00005-SAG-a27cf06"


def _multi_touch(record: SeriesProgress, pipe: redis.client.Pipeline, **fields: object) -> None:
    now = time.time()
    fields["updatedAt"] = now
    pipe.hset(record.info_key, mapping={k: str(v) for k, v in fields.items()})
    pipe.zadd(INDEX_KEY, {f"{record.pacs_name}/{record.series_uid}": now})
    pipe.zremrangebyrank(INDEX_KEY, 0, -INDEX_LENGTH - 1)
    pipe.sadd(_senders_key(record.series_uid), record.pacs_name)
    for key in (*record._all, _senders_key(record.series_uid)):
        pipe.expire(key, PROGRESS_TTL)


def _multi_count(record: SeriesProgress, pipe: redis.client.Pipeline, members: str, done: str,
                 key: str, sop: str) -> None:
    """The first four commands of both steps: the SOP in `members`, the key in `done`, its
    error cleared, the count of `members` (the reply the step returns, index 3)."""
    pipe.sadd(members, sop)
    pipe.sadd(done, key)
    pipe.hdel(record.errors_key, key)
    pipe.scard(members)


def multi_stored(record: SeriesProgress, key: str, sop: str) -> int:
    pipe = record.connection.pipeline()
    _multi_count(record, pipe, record.stored_key, record.done_key, key, sop)
    pipe.hsetnx(record.info_key, "attempt", new_attempt_id())
    pipe.hsetnx(record.info_key, "state", SeriesState.RECEIVING.value)
    _multi_touch(record, pipe, pacs_name=record.pacs_name, path=FOLDER, announced=192)
    pipe.hgetall(record.info_key)
    return int(pipe.execute()[3])


def multi_registered(record: SeriesProgress, key: str, sop: str) -> int:
    pipe = record.connection.pipeline()
    _multi_count(record, pipe, record.registered_key, record.regdone_key, key, sop)
    _multi_touch(record, pipe)
    return int(pipe.execute()[3])


def server_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(connection: redis.Redis, pid: int, how: str, count: int) -> tuple[float, float, float]:
    """(wall, client CPU, server CPU) in ms per instance, for `count` instances of one series."""
    connection.flushall()
    record = SeriesProgress(connection, "PACS1", "1.2.840.99")
    wall, cpu, server = time.perf_counter(), time.process_time(), server_cpu(pid)
    for n in range(count):
        key, sop = f"orthanc-{n}", f"1.2.840.99.{n}"
        if how == "script":
            stored = record.stored(key, sop, "PACS1", FOLDER, 192)[0]
            registered = record.registered(key, sop)
        else:
            stored, registered = multi_stored(record, key, sop), multi_registered(record, key, sop)
        assert stored == registered == n + 1
    return tuple(x / count * 1000 for x in (time.perf_counter() - wall, time.process_time() - cpu,
                                            server_cpu(pid) - server))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pids: list[int] = []
    with private_redis(pids) as url:
        connection = redis.Redis.from_url(url)
        found: dict[str, list[tuple[float, float, float]]] = {"multi": [], "script": []}
        for _ in range(args.rounds):
            for how in found:
                found[how].append(run(connection, pids[0], how, args.instances))
    medians = {how: [statistics.median(r[i] for r in rows) for i in range(3)] for how, rows in found.items()}
    print(f"{args.instances} instances stored + registered, median of {args.rounds} rounds, ms per instance:")
    print(f"  {'':8} {'wall':>8} {'client CPU':>11} {'redis CPU':>10}")
    for how, (wall, cpu, server) in medians.items():
        print(f"  {how:8} {wall:8.3f} {cpu:11.3f} {server:10.3f}")
    ratio = [s / m if m else float("nan") for s, m in zip(medians["script"], medians["multi"])]
    print(f"  {'script/multi':12} {ratio[0]:4.2f} {ratio[1]:11.2f} {ratio[2]:10.2f}")


if __name__ == "__main__":
    main()
