"""The demo's statistics against values worked out by hand and by scipy's own paired t-test."""

from __future__ import annotations

import pytest

from flows.demo.stats import paired_difference, summarise


def test_summary_is_mean_and_sample_std():
    s = summarise([0.5, 0.7, 0.6])
    assert s.mean == pytest.approx(0.6) and s.std == pytest.approx(0.1) and s.n == 3


def test_paired_interval_matches_scipy():
    from scipy import stats

    a, b = [0.44, 0.71, 0.50, 0.64, 0.48], [0.20, 0.20, 0.41, 0.32, 0.25]
    d = paired_difference(a, b)
    result = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((result.low, result.high))
    assert d.low < d.mean < d.high and d.n == 5


def test_a_difference_needs_pairs():
    with pytest.raises(ValueError):
        paired_difference([0.5], [0.4])
