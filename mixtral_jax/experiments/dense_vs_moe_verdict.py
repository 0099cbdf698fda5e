"""dense_vs_moe's verdict: sentences computed from the measured numbers (never written by hand),
so the report says exactly what the paired interval, the gap's trend and the speed-up show."""

from __future__ import annotations

from typing import Sequence

from mixtral_jax.experiments.paired_stats import PairedGap


def _ci(gap: PairedGap) -> str:
    if gap.low is None:
        return f"{gap.mean:+.4f} nats (one seed pair: no interval)"
    return f"{gap.mean:+.4f} nats (95% CI [{gap.low:+.4f}, {gap.high:+.4f}], n = {gap.n} seed pairs)"


def _primary(gap: PairedGap, moe: str, dense: str) -> str:
    if gap.excludes_zero:
        side = "lower (better)" if gap.mean < 0 else "HIGHER (worse)"
        return (f"{moe} ends with a held-out loss {side} than {dense}: paired gap (b) - (a) = {_ci(gap)}; "
                "the interval excludes zero.")
    return (f"{moe} and {dense} are NOT distinguishable at this budget: paired gap (b) - (a) = {_ci(gap)}; "
            "the interval contains zero (or there are too few seeds for one).")


def _trend(over: list[dict], trend: dict) -> str:
    if len(over) < 2:
        return ""
    first, mid, last = over[0], over[(len(over) - 1) // 2], over[-1]
    path = [first, mid, last] if len(over) > 2 else [first, last]
    text = "Over training the gap goes " + " -> ".join(f"{p['mean']:+.4f} (step {p['step']})" for p in path)
    slope, (low, high) = trend.get("slope_per_decade"), trend.get("slope_ci95", [None, None])
    if slope is None:
        return text + "."
    # a direction is claimed only when the per-seed slopes' interval excludes zero: a line through
    # a few noisy points can tilt either way by chance
    interval = "" if low is None else f", 95% CI [{low:+.4f}, {high:+.4f}] over seeds"
    if low is not None and (low > 0 or high < 0):
        moves = "narrows in the MoE's favour" if high < 0 else "moves against the MoE"
        text += f"; over the second half it {moves} ({slope:+.4f} nats per decade of tokens{interval})"
    else:
        text += (f"; over the second half its fitted slope is {slope:+.4f} nats per decade of tokens{interval}, "
                 "not distinguishable from flat")
    zero = trend.get("zero_at_tokens")
    if zero is not None:
        text += (f"; extrapolated (log-linear, second half only, a rough guide) the MoE would draw level near "
                 f"{zero:,.3g} tokens, {zero / last['tokens']:.1f}x this budget")
    elif last["mean"] > 0:
        text += "; the fitted line does not point to the MoE drawing level at a larger budget"
    return text + "."


def _speed(speed: Sequence[dict]) -> str:
    if not speed:
        return ""
    reached = [x for x in speed if x["tokens"] is not None]
    if not reached:
        return "The MoE never reached the dense arm's final loss (speed-up to target: not reached)."
    tok = [x["tokens_speedup"] for x in reached]
    flops = [x["flops_speedup"] for x in reached if x["flops_speedup"]]
    secs = [x["seconds_speedup"] for x in reached if x["seconds_speedup"]]
    return (f"The MoE reached its paired dense run's final loss in {len(reached)} of {len(speed)} seeds, with "
            f"{min(tok):.2f}-{max(tok):.2f}x fewer tokens"
            + (f", {min(flops):.2f}-{max(flops):.2f}x fewer FLOPs" if flops else "")
            + (f" and {min(secs):.2f}-{max(secs):.2f}x fewer seconds (x < 1: slower)" if secs else "") + ".")


def _others(arms: dict, primary: dict[str, str]) -> str:
    """Single-seed arms against (a)'s run of the same seed (same data order): the seed-to-seed
    spread of (a) is larger than these arms' differences, so a seed mean would mislead."""
    dense = arms[primary["dense"]]
    lines = []
    for name, a in arms.items():
        if name in primary.values():
            continue
        pairs = [(loss, dense["final_loss"][dense["seeds"].index(seed)])
                 for seed, loss in zip(a["seeds"], a["final_loss"]) if seed in dense["seeds"]]
        versus = ("no (a) run of its seed" if not pairs else
                  f"{sum(x - y for x, y in pairs) / len(pairs):+.4f} against (a)'s run of the same seed")
        lines.append(f"{a['label']}: {a['final_loss_mean']:.4f} ({versus}; "
                     f"{len(a['seeds'])} seed{'s' if len(a['seeds']) > 1 else ''}, no interval)")
    return ("Other arms: " + "; ".join(lines) + ".") if lines else ""


def _downstream(arms: dict, primary: dict[str, str], gap: PairedGap | None) -> str:
    dense, moe = arms[primary["dense"]].get("downstream"), arms[primary["moe"]].get("downstream")
    if not dense or not moe:
        return ""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    text = (f"On the downstream task {dense['task']} ({dense['items']} items, chance 0.25) (b) scores acc "
            f"{mean(moe['acc']):.3f} and (a) {mean(dense['acc']):.3f}")
    if gap is not None and gap.low is not None:
        text += (f" (seed means): paired gap {gap.mean:+.3f} (95% CI [{gap.low:+.3f}, {gap.high:+.3f}]); "
                 + ("the interval excludes zero" if gap.excludes_zero else "the interval contains zero"))
    return text + "."


def verdict(gap: PairedGap, over: list[dict], trend: dict, speed: Sequence[dict], arms: dict,
            primary: dict[str, str], downstream_gap: PairedGap | None = None) -> str:
    moe, dense = arms[primary["moe"]]["label"], arms[primary["dense"]]["label"]
    parts = [_primary(gap, moe, dense), _trend(over, trend), _speed(speed), _downstream(arms, primary, downstream_gap),
             _others(arms, primary)]
    return " ".join(p for p in parts if p)
