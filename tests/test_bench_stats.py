"""The ingest benchmark's statistics: the interval that decides whether a target is met."""

import os
import statistics
import time

from bench.ingest import median_interval, rotation_ratios, settle

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
