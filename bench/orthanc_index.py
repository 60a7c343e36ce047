"""Orthanc's ingest with its index in SQLite (the default) vs PostgreSQL (ORTHANC_DB_URL), side by side.

Two Orthancs without any plugin (what the index costs, nothing else), one on SQLite in its
storage folder, one on Debian's orthanc-postgresql index plugin with a throwaway database on
the machine's PostgreSQL (DICOMFLOW_TEST_POSTGRES, default 127.0.0.1:5432 as user postgres;
dropped at the end). Each round sends a new chunk of generated instances (fresh UIDs) with
dcmtk's storescu over one association (TCP_NODELAY) to each, in an order that alternates, so
both see the same machine load and a growing index. Prints instances/s per round, the
medians, and PostgreSQL/SQLite (of the medians and the median of the per-round ratios).

    .venv/bin/python -m bench.orthanc_index --rounds 6 --chunk 500
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.orthanc import OrthancServer, stop_all, write_series
from tests.support.orthanc_index import create_database, drop_database


def send(server: OrthancServer, files: Sequence[Path]) -> float:
    """Send `files` over one association; instances/s."""
    start = time.perf_counter()
    server.store([files[0].parent])
    return len(files) / (time.perf_counter() - start)


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.orthanc_index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="chunks sent to each Orthanc [6]")
    parser.add_argument("--chunk", type=int, default=500, help="instances per chunk [500]")
    parser.add_argument("--rows", type=int, default=64, help="image size (rows = columns) [64: ~9 KB]")
    options = parser.parse_args(args)
    with tempfile.TemporaryDirectory(prefix="dicomflow-bench-index-") as tmp:
        root = Path(tmp)
        db_url = create_database("dicomflow_bench_orthanc")
        servers = {"sqlite": OrthancServer(root / "sqlite", plugin=False, db_url=""),
                   "postgresql": OrthancServer(root / "postgresql", plugin=False, db_url=db_url)}
        rates: dict[str, list[float]] = {name: [] for name in servers}
        try:
            for server in servers.values():
                server.start()
            for number in range(options.rounds):
                order = list(servers) if number % 2 == 0 else list(reversed(servers))
                for name in order:
                    files = write_series(root / f"chunk-{number}-{name}", options.chunk,
                                         rows=options.rows, columns=options.rows, patient_id=f"IDX{number}")
                    rates[name].append(send(servers[name], files))
                print(f"round {number + 1}: " + ", ".join(f"{n} {rates[n][-1]:.0f}/s" for n in servers), flush=True)
            counts = {n: s.get("/statistics")["CountInstances"] for n, s in servers.items()}
        finally:
            stop_all(list(servers.values()))
            drop_database(db_url)
    sqlite, pg = (statistics.median(rates[n]) for n in ("sqlite", "postgresql"))
    per_round = statistics.median(p / s for p, s in zip(rates["postgresql"], rates["sqlite"]))
    print(f"\n{options.rounds} rounds of {options.chunk} instances ({options.rows}x{options.rows}), "
          f"index sizes at the end: {counts}")
    print(f"  SQLite index      median {sqlite:.0f} instances/s  ({', '.join(f'{r:.0f}' for r in rates['sqlite'])})")
    print(f"  PostgreSQL index  median {pg:.0f} instances/s  ({', '.join(f'{r:.0f}' for r in rates['postgresql'])})")
    print(f"  PostgreSQL/SQLite {pg / sqlite:.2f} (of the medians), {per_round:.2f} (median of the per-round ratios)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
