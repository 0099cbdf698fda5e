"""paired_stats against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from mixtral_jax.experiments.paired_stats import (compute_multiplier, extrapolated_multiplier, first_reach,
                                                  interpolate, mean_std, paired_gap, t_quantile)


def test_mean_and_sample_std():
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and std == pytest.approx(math.sqrt(5 / 3))  # squares 2.25+0.25+0.25+2.25 = 5, / 3
    assert mean_std([7.0]) == (7.0, None)


def test_paired_gap_t_interval():
    # diffs b - a = -0.02, -0.04, -0.03: mean -0.03, s = 0.01, t_{0.975,2} = 4.303
    gap = paired_gap([3.00, 3.10, 2.90], [2.98, 3.06, 2.87])
    assert gap.mean == pytest.approx(-0.03) and gap.n == 3
    half = 4.303 * 0.01 / math.sqrt(3)  # 0.024844
    assert gap.low == pytest.approx(-0.03 - half) and gap.high == pytest.approx(-0.03 + half)
    assert gap.excludes_zero
    wide = paired_gap([1.0, 1.0], [1.1, 0.95])  # diffs 0.1, -0.05: mean 0.025, s = 0.10607, t = 12.706
    assert wide.low == pytest.approx(0.025 - 12.706 * 0.15 / math.sqrt(2) / math.sqrt(2))
    assert not wide.excludes_zero
    one = paired_gap([1.0], [0.9])
    assert one.mean == pytest.approx(-0.1) and one.low is None and not one.excludes_zero
    with pytest.raises(ValueError):
        paired_gap([1.0, 2.0], [1.0])


def test_t_table():
    assert t_quantile(1) == 12.706 and t_quantile(9) == 2.262 and t_quantile(30) == 1.96
    with pytest.raises(ValueError):
        t_quantile(0)


def test_first_reach_interpolates_the_crossing():
    xs, ys = [1.0, 2.0, 4.0], [5.0, 4.0, 3.0]
    assert first_reach(xs, ys, 3.5) == pytest.approx(3.0)  # halfway from (2, 4) to (4, 3)
    assert first_reach(xs, ys, 6.0) == 1.0
    assert first_reach(xs, ys, 2.9) is None
    assert interpolate(xs, ys, 3.0) == pytest.approx(3.5) and interpolate(xs, ys, 5.0) is None


def test_compute_multiplier():
    # dense reaches loss 3.5 at 3.0 FLOPs; the MoE got there with 1.5 FLOPs: 2x
    assert compute_multiplier([1.0, 2.0, 4.0], [5.0, 4.0, 3.0], 1.5, 3.5) == pytest.approx(2.0)
    assert compute_multiplier([1.0, 2.0, 4.0], [5.0, 4.0, 3.0], 1.5, 2.0) is None


def test_extrapolated_multiplier():
    # dense loss = 5 - log10(FLOPs) exactly (second half: 1e3, 1e4 -> 2, 1); loss 0.5 is reached at
    # 10^4.5 FLOPs, and the MoE got there with 1e4: 10^0.5 = 3.162x
    flops, loss = [1e1, 1e2, 1e3, 1e4], [4.0, 3.0, 2.0, 1.0]
    assert extrapolated_multiplier(flops, loss, 1e4, 0.5) == pytest.approx(10 ** 0.5)
    # only the second half is fitted: a steeper start does not change it
    assert extrapolated_multiplier(flops, [9.0, 7.0, 2.0, 1.0], 1e4, 0.5) == pytest.approx(10 ** 0.5)
    assert extrapolated_multiplier(flops, [4.0, 3.0, 2.0, 2.5], 1e4, 0.5) is None  # the fitted line rises
