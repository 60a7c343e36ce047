"""The ingest benchmark's statistics: the interval that decides whether a target is met."""

import statistics

from bench.ingest import median_interval

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
