"""dense_vs_moe's numbers per run and per arm pair: the held-out curve against tokens, FLOPs and
seconds (an upcycled run's including its dense parent's cost), the paired gap at every eval point,
its trend, and the cost to reach a target loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mixtral_jax.experiments.dense_vs_moe_arms import ArmRun
from mixtral_jax.experiments.paired_stats import first_reach, interpolate, paired_gap


@dataclass
class Curve:
    """Held-out loss at each eval, with the cost spent to get there (an upcycled run's cost
    includes its dense parent's up to the upcycling step)."""

    steps: list[int]
    tokens: list[float]
    flops: list[float]
    seconds: list[float]
    loss: list[float]


def _clock_s(run, step: int) -> float:
    steps, hours = run.series("device_hours")
    value = interpolate(steps, hours, step)
    return float("nan") if value is None else value * 3600.0


def curve(r: ArmRun) -> Curve:
    res = r.result
    per_step = res.cfg.data.batch_size * res.cfg.data.seq_len
    steps, losses = res.series("eval_loss")
    tokens0 = flops0 = seconds0 = 0.0
    head = Curve([], [], [], [], [])
    if r.parent is not None:
        tokens0 = r.start_step * per_step
        flops0 = tokens0 * r.parent.summary["train_flops_per_token"]
        seconds0 = _clock_s(r.parent, r.start_step)
        p_steps, p_loss = r.parent.series("eval_loss")
        if r.start_step in p_steps:  # the point it was upcycled at
            head = Curve([r.start_step], [tokens0], [flops0], [seconds0], [p_loss[p_steps.index(r.start_step)]])
    fpt = res.summary["train_flops_per_token"]
    return Curve(head.steps + [r.start_step + s for s in steps],
                 head.tokens + [tokens0 + s * per_step for s in steps],
                 head.flops + [flops0 + s * per_step * fpt for s in steps],
                 head.seconds + [seconds0 + _clock_s(res, s) for s in steps], head.loss + list(losses))


def gap_over_training(dense: list[ArmRun], moe: list[ArmRun]) -> list[dict]:
    """Paired moe - dense held-out gap at every eval step both arms share, over the common seeds."""
    pairs = [(d, m) for d in dense for m in moe if d.seed == m.seed]
    curves = [(curve(d), curve(m)) for d, m in pairs]
    if not curves:
        return []
    shared = sorted(set.intersection(*[set(cd.steps) & set(cm.steps) for cd, cm in curves]))
    rows = []
    for step in shared:
        a = [cd.loss[cd.steps.index(step)] for cd, _ in curves]
        b = [cm.loss[cm.steps.index(step)] for _, cm in curves]
        gap = paired_gap(a, b)
        rows.append({"step": step, "tokens": curves[0][0].tokens[curves[0][0].steps.index(step)], "mean": gap.mean,
                     "low": gap.low, "high": gap.high, "n": gap.n, "diffs": [y - x for x, y in zip(a, b)]})
    return rows


def trend(rows: list[dict]) -> dict:
    """Least-squares line of the gap against log10(tokens) over the second half of the eval points:
    its slope per decade (fitted to the seed-mean gap), a 95% t-interval for that slope from the
    per-seed slopes (each seed pair's own gap curve fitted alike, so the interval carries the seed
    spread), and the token count where the fitted line crosses zero if it heads that way from above."""
    tail = rows[len(rows) // 2:]
    if len(tail) < 2:
        return {"slope_per_decade": None, "slope_ci95": [None, None], "zero_at_tokens": None}
    x = np.log10([r["tokens"] for r in tail])
    y = np.array([r["mean"] for r in tail])
    slope, intercept = np.polyfit(x, y, 1)
    per_seed = [float(np.polyfit(x, [r["diffs"][i] for r in tail], 1)[0]) for i in range(len(tail[0]["diffs"]))]
    spread = paired_gap([0.0] * len(per_seed), per_seed)
    zero = None
    if y[-1] > 0 and slope < 0:  # above zero and heading down to it
        zero = float(10 ** (-intercept / slope))
    return {"slope_per_decade": float(slope), "slope_ci95": [spread.low, spread.high], "zero_at_tokens": zero}


def speedup(target: float, base: Curve, other: Curve) -> dict:
    """What `other` needs to reach `target` (the dense arm's final loss), against what the dense
    run spent: ratios > 1 mean `other` got there faster. None where it never reached it."""
    out = {}
    for key in ("tokens", "flops", "seconds"):
        need = first_reach(getattr(other, key), other.loss, target)
        spent = getattr(base, key)[-1]
        out[key] = need
        out[f"{key}_speedup"] = None if need is None or need <= 0 else spent / need
    return out


