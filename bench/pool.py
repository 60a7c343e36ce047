"""Pool the ratios of several `bench.ingest` runs of the same code, read back from their printed logs.

One run's interval says how its rounds scatter, not how runs scatter: on this VM the floor
(b) moves between runs by more than one run's interval. Pooling the per-round rates of
several runs (each with its own rotations) gives the figure for the code, with the same
statistics `bench.ingest` prints per run:

    .venv/bin/python -m bench.ingest --setups a,b,c --ct 0 --rounds 60 | tee run1.log
    .venv/bin/python -m bench.pool c b run1.log run2.log run3.log
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.ingest import LABELS, median_interval, rotation_ratios

_SECTION = re.compile(r"## (\w+):")
_ROUND = re.compile(r"\s+round\s+\d+: (.*) inst/s")
_RATE = re.compile(r"(\([^)]+\))\s+([\d.]+)")
#: "(c-prio0)" -> "cq": the printed label of each setup back to its key.
_KEYS = {label.split()[0]: key for key, label in LABELS.items()}


def read_rounds(lines: Iterable[str], size: str = "small") -> list[dict[str, float]]:
    """The per-round rates ({setup key: instances/s}, in the printed order) of one size."""
    rounds, current = [], None
    for line in lines:
        section = _SECTION.match(line)
        if section:
            current = section.group(1)
            continue
        found = _ROUND.match(line)
        if found and current == size:
            rounds.append({_KEYS[label]: float(rate) for label, rate in _RATE.findall(found.group(1))})
    return rounds


def pooled(runs: Sequence[list[dict[str, float]]], x: str, y: str) -> tuple[list[float], list[float]]:
    """x/y of every round and of every rotation (each run rotates through its own setups)."""
    per_round, per_rotation = [], []
    for rounds in runs:
        xs, ys = [r[x] for r in rounds], [r[y] for r in rounds]
        per_round += [a / b for a, b in zip(xs, ys)]
        per_rotation += rotation_ratios(xs, ys, len(rounds[0]))
    return per_round, per_rotation


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("x", help="setup key of the numerator (e.g. c)")
    parser.add_argument("y", help="setup key of the denominator (e.g. b)")
    parser.add_argument("logs", nargs="+", type=Path, help="bench.ingest outputs (alternating method)")
    parser.add_argument("--size", default="small", choices=("small", "ct"))
    options = parser.parse_args(args)
    runs = []
    for path in options.logs:
        rounds = read_rounds(path.read_text().splitlines(), options.size)
        if not rounds or options.x not in rounds[0] or options.y not in rounds[0]:
            parser.error(f"{path}: no {options.size} rounds with ({options.x}) and ({options.y})")
        runs.append(rounds)
        per_round, per_rotation = pooled([rounds], options.x, options.y)
        print(f"{path}: {len(rounds)} rounds, {options.x}/{options.y} per round {statistics.median(per_round):.3f}, "
              f"per rotation {statistics.median(per_rotation):.3f}")
    per_round, per_rotation = pooled(runs, options.x, options.y)
    for name, values in (("per round", per_round), ("per rotation", per_rotation)):
        low, high = median_interval(values)
        print(f"pooled {options.x}/{options.y} {name} ({len(values)}): median {statistics.median(values):.3f} "
              f"(95 % interval {low:.3f}-{high:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
