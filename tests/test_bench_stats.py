"""The ingest benchmark's statistics: the interval that decides whether a target is met."""

import os
import statistics
import time

from bench.ingest import median_interval, rotation_ratios, settle
from bench.pool import pooled, read_rounds

#: Ten rounds spread as this VM's per-round ratios do (±10 %), median 0.97.
ROUNDS = [0.85, 0.88, 0.91, 0.94, 0.96, 0.98, 1.00, 1.03, 1.06, 1.09]


def test_the_interval_holds_the_median_and_narrows_with_more_rounds():
    few, many = ROUNDS, ROUNDS * 16
    for values in (few, many):
        low, high = median_interval(values)
        assert low <= statistics.median(values) <= high
    few_low, few_high = median_interval(few)
    many_low, many_high = median_interval(many)
    assert many_high - many_low < (few_high - few_low) / 2
    # The same spread: 10 rounds cannot show a median above 0.95, 160 rounds can.
    assert few_low < 0.95 < many_low


def test_rounds_that_agree_give_no_spread():
    assert median_interval([0.96] * 12) == (0.96, 0.96)


def test_settled_files_are_read_without_dirtying_their_inodes(tmp_path):
    """`settle` reads a chunk once before it is timed: storescu's read then leaves the atime alone."""
    files = [tmp_path / f"{n}.dcm" for n in range(3)]
    for path in files:
        path.write_bytes(b"x" * 100)
    settle(tmp_path)
    before = [os.stat(path).st_atime_ns for path in files]
    time.sleep(0.05)
    for path in files:
        path.read_bytes()
    assert [os.stat(path).st_atime_ns for path in files] == before


def test_a_rotation_cancels_who_went_first():
    """Two setups, the order alternating, the first chunk of each round 10 % slow: the
    per-round ratios split in two groups; each rotation's ratio is the true one."""
    true_ratio, first_penalty = 0.96, 0.90
    b_rates, c_rates = [], []
    for round_ in range(1, 21):
        c_first = round_ % 2 == 1  # bench_alternating's order for setups (b, c)
        b_rates.append(500.0 * (1.0 if c_first else first_penalty))
        c_rates.append(500.0 * true_ratio * (first_penalty if c_first else 1.0))
    per_round = sorted(c / b for c, b in zip(c_rates, b_rates))
    assert per_round[0] < 0.9 and per_round[-1] > 1.0  # two groups, neither near 0.96
    rotations = rotation_ratios(c_rates, b_rates, period=2)
    assert len(rotations) == 10
    assert all(abs(r - true_ratio) < 1e-9 for r in rotations)
    # A round past the last full rotation is left out, not averaged alone.
    assert len(rotation_ratios(c_rates[:5], b_rates[:5], period=2)) == 2


def _log(rates: list[dict[str, float]], labels: dict[str, str]) -> list[str]:
    """A bench.ingest output as it prints it: headers, rounds, a CT section to be left alone."""
    lines = ["storescu -> Orthanc 1.10, ...", "", "## small: 4 rounds of 1000 instances 64x64 ..."]
    for number, rates_of_round in enumerate(rates, start=1):
        lines.append(f"  round {number:2d}: " + "  ".join(f"{labels[k]} {v:6.1f}" for k, v in rates_of_round.items())
                     + " inst/s")
    lines += ["  median rates: ...", "## ct: 4 rounds of 100 instances 512x512 ...",
              "  round  1: " + "  ".join(f"{labels[k]}    1.0" for k in rates[0]) + " inst/s"]
    return lines


def test_pooled_runs_read_back_from_their_logs_rotate_within_each_run():
    labels = {"b": "(b)", "c": "(c)", "cq": "(c-prio0)"}
    # Run 1 (b, c): whoever goes first is 10 % slower; the true (c)/(b) is 0.95.
    first = [{"b": 100.0, "c": 95.0 * 0.9}, {"b": 100.0 * 0.9, "c": 95.0}] * 2
    # Run 2 (b, c, c-prio0): three setups, so a rotation is three rounds.
    second = [{"b": 200.0, "c": 190.0, "cq": 180.0}] * 3
    runs = [read_rounds(_log(first, labels)), read_rounds(_log(second, labels))]
    assert runs[0] == first and runs[1] == second  # the CT section is not mixed in
    per_round, per_rotation = pooled(runs, "c", "b")
    assert len(per_round) == 7 and len(per_rotation) == 2 + 1
    assert sorted({round(r, 3) for r in per_round}) == [0.855, 0.95, 1.056]
    assert [round(r, 6) for r in per_rotation] == [0.95, 0.95, 0.95]
    assert read_rounds(_log(second, labels), size="ct") == [{"b": 1.0, "c": 1.0, "cq": 1.0}]
