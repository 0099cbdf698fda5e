"""Small statistics for comparing training runs over seeds, in plain Python (scipy is not a
dependency): mean ± sample std, the paired same-seed difference with a t-distribution confidence
interval, where a loss curve first reaches a target, and the compute multiplier that follows."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..10 (standard tables); more
# degrees of freedom than a CPU study has seeds are not needed, beyond 10 the normal 1.96 is
# within 15% and is used with a note in `t_quantile`'s docstring.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_quantile(df: int) -> float:
    """t_{0.975, df}: the table for df <= 10, 1.96 (the normal limit, slightly narrow) above."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 paired values (df >= 1), got df={df}")
    return T975.get(df, 1.96)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std None for a single value."""
    vals = list(values)
    if not vals:
        raise ValueError("no values")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


@dataclass(frozen=True)
class PairedGap:
    """b - a over paired values (same seed): mean, 95% CI [low, high], n pairs. low / high are
    None with one pair (no spread to estimate)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)


def paired_gap(a: Sequence[float], b: Sequence[float]) -> PairedGap:
    """The mean of b_i - a_i over pairs i with a t-distribution 95% CI: mean ± t_{0.975,n-1} s/sqrt(n)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need equal, non-zero lengths, got {len(a)} and {len(b)}")
    diffs = [y - x for x, y in zip(a, b)]
    mean, std = mean_std(diffs)
    if std is None:
        return PairedGap(mean, None, None, 1)
    half = t_quantile(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return PairedGap(mean, mean - half, mean + half, len(diffs))


def first_reach(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The x at which the curve (xs increasing, ys a loss) first reaches ys <= target, linearly
    interpolated between the two eval points around the crossing; None if it never does."""
    if not xs:
        return None
    if ys[0] <= target:
        return float(xs[0])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 <= target:
            return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1))
    return None


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """ys at x by linear interpolation (None outside [xs[0], xs[-1]])."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if x0 <= x <= x1:
            return float(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return float(ys[-1])


def compute_multiplier(dense_flops: Sequence[float], dense_loss: Sequence[float], moe_flops: float,
                       moe_loss: float) -> float | None:
    """How many times the MoE's training FLOPs the dense model needs to reach the MoE's final loss,
    read off the dense curve (> 1: the MoE is the more compute-efficient). None when the dense
    curve never gets that low (the multiplier is then larger than the dense run measures)."""
    reach = first_reach(dense_flops, dense_loss, moe_loss)
    return None if reach is None else reach / moe_flops


def extrapolated_multiplier(dense_flops: Sequence[float], dense_loss: Sequence[float], moe_flops: float,
                            moe_loss: float) -> float | None:
    """compute_multiplier's estimate where the dense curve never gets as low as the MoE: the
    dense loss extended past its last point as a straight line in log10(FLOPs), fitted by least
    squares to the second half of its points (the part of a run's curve closest to a power law).
    None when that line does not fall. An extrapolation: report it as one, not as a measurement."""
    half = len(dense_flops) // 2
    xs = [math.log10(f) for f in dense_flops[half:]]
    ys = list(dense_loss[half:])
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    if slope >= 0:
        return None
    return 10 ** (mx + (moe_loss - my) / slope) / moe_flops
