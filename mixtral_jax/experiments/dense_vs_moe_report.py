"""dense_vs_moe's report: eval curves against tokens / FLOPs / seconds, the paired same-seed gap
with its 95% interval (final and at every eval point), speed-up to the dense arm's final loss,
router health and throughput; report.md, PNGs and results.json (DESIGN.md's form). Every number
comes from the runs' own summary.json / metrics.jsonl."""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path
from typing import Sequence

import numpy as np

from mixtral_jax.experiments import report
from mixtral_jax.experiments.dense_vs_moe_arms import ArmRun
from mixtral_jax.experiments.dense_vs_moe_curves import curve, gap_over_training, speedup, trend
from mixtral_jax.experiments.dense_vs_moe_plots import curve_plot, gap_plot, heatmaps
from mixtral_jax.experiments.paired_stats import PairedGap, mean_std, paired_gap

ROUTER_KEYS = ("moe/load_max_over_mean", "moe/load_cv", "moe/router_entropy")
TAIL = 5  # router figures: mean of the last 5 logged records


def _by_arm(runs: Sequence[ArmRun]) -> dict[str, list[ArmRun]]:
    arms: dict[str, list[ArmRun]] = {}
    for r in runs:
        arms.setdefault(r.arm.name, []).append(r)
    return arms


def _final(r: ArmRun) -> float:
    return r.result.summary["eval_loss"]


def _tail(r: ArmRun, key: str) -> float | None:
    values = r.result.series(key)[1][-TAIL:]
    return float(np.mean(values)) if values else None


def _tokens_per_s(r: ArmRun) -> float:
    # the median step: robust to compile time and to other jobs sharing the CPU for a while
    return statistics.median(r.result.series("tokens_per_s")[1])


def _ms(values: Sequence[float], spec: str = ".4f") -> str:
    mean, std = mean_std(values)
    return f"{mean:{spec}}" + (f" ± {std:{spec}}" if std is not None else " (1 seed)")


def _ci(gap: PairedGap) -> str:
    if gap.low is None:
        return f"{gap.mean:+.4f} (1 pair: no interval)"
    return f"{gap.mean:+.4f} [{gap.low:+.4f}, {gap.high:+.4f}]"


def _router_rows(arms: dict[str, list[ArmRun]]) -> tuple[list[list], dict]:
    rows, data = [], {}
    for name, runs in arms.items():
        if not runs[0].result.cfg.model.is_moe:
            continue
        vals = {k: [_tail(r, k) for r in runs] for k in ROUTER_KEYS}
        data[name] = {k.split("/")[1]: statistics.fmean([v for v in vs if v is not None]) for k, vs in vals.items()
                      if any(v is not None for v in vs)}
        experts = runs[0].result.cfg.model.moe.num_experts
        rows.append([runs[0].arm.label, *(report.pm(vals[k], ".3f") for k in ROUTER_KEYS), f"{math.log(experts):.3f}"])
    return rows, data


def _fmt_big(x: float | None, spec: str = ".3g") -> str:
    return "not reached" if x is None else format(x, spec)


def write(out: Path, runs: Sequence[ArmRun], primary: dict[str, str], smoke: bool = False,
          note: str | None = None) -> Path:
    from mixtral_jax.experiments.dense_vs_moe_verdict import verdict

    arms = _by_arm(runs)
    dense, moe = arms[primary["dense"]], arms[primary["moe"]]
    base = dense[0].result
    per_step = base.cfg.data.batch_size * base.cfg.data.seq_len
    heldout = heldout_tokens(base)

    rows, arm_data = [], {}
    for name, rs in arms.items():
        s = rs[0].result.summary
        c = curve(rs[0])
        finals = [_final(r) for r in rs]
        tps = [_tokens_per_s(r) for r in rs]
        mean, std = mean_std(finals)
        arm_data[name] = {"label": rs[0].arm.label, "config": rs[0].arm.config, "seeds": [r.seed for r in rs],
                          "params_total": s["params_total"], "params_active": s["params_active"],
                          "train_flops_per_token": s["train_flops_per_token"], "tokens": c.tokens[-1],
                          "training_flops": c.flops[-1], "lr": rs[0].result.cfg.optim.lr,
                          "final_loss_mean": mean, "final_loss_std": std, "final_loss": finals,
                          "tokens_per_s": statistics.fmean(tps), "seconds": c.seconds[-1]}
        rows.append([rs[0].arm.label, f"{s['params_total']:,} / {s['params_active']:,}",
                     f"{s['train_flops_per_token']:.4g}", f"{c.tokens[-1]:,.0f}", f"{c.flops[-1]:.3g}",
                     f"{rs[0].result.cfg.optim.lr:g}", len(rs), _ms(finals), f"{statistics.fmean(tps):,.0f}",
                     f"{statistics.fmean(curve(r).seconds[-1] for r in rs):,.0f}"])
    final_gap = paired_gap([_final(d) for d in dense for m in moe if d.seed == m.seed],
                           [_final(m) for d in dense for m in moe if d.seed == m.seed])
    over = gap_over_training(dense, moe)
    tr = trend(over)
    # Speed-up to target: the dense arm's final loss, per seed for paired arms, else dense seed 0.
    speed = {}
    for name, rs in arms.items():
        if name == primary["dense"]:
            continue
        speed[name] = []
        for r in rs:
            d = next((x for x in dense if x.seed == r.seed), dense[0])
            speed[name].append({"seed": r.seed, "target_seed": d.seed, "target": _final(d),
                                **speedup(_final(d), curve(d), curve(r))})
    router_rows, router = _router_rows(arms)
    plots = [curve_plot(arms, out), gap_plot(over, dense, moe, out)]
    heat = heatmaps(arms, out)
    if heat:
        plots.append(heat)
    text = verdict(final_gap, over, tr, speed.get(primary["moe"], []), arm_data, primary)

    speed_rows = [[arms[n][0].arm.label, x["seed"], f"{x['target']:.4f}", _fmt_big(x["tokens"], ",.0f"),
                   _fmt_big(x["tokens_speedup"], ".2f"), _fmt_big(x["flops"]), _fmt_big(x["flops_speedup"], ".2f"),
                   _fmt_big(x["seconds"], ",.0f"), _fmt_big(x["seconds_speedup"], ".2f")]
                  for n, xs in speed.items() for x in xs]
    gap_rows = [[r["step"], f"{r['tokens']:,.0f}", f"{r['mean']:+.4f}",
                 "n/a" if r["low"] is None else f"[{r['low']:+.4f}, {r['high']:+.4f}]"] for r in over]
    pairs = [(d.seed, _final(d), _final(m)) for d in dense for m in moe if d.seed == m.seed]
    sections = [
        f"# dense_vs_moe{' (smoke)' if smoke else ''}",
        f"Primary claim: {moe[0].arm.label} against {dense[0].arm.label} at equal active compute, paired by seed "
        f"(same seed = same data order). {base.cfg.train.steps} steps x {per_step:,} tokens "
        f"(seq {base.cfg.data.seq_len}, batch {base.cfg.data.batch_size}); held-out: the same {heldout:,} tokens "
        f"for every run, evaluated every {base.cfg.train.eval_every} steps. Hardware "
        f"`{base.summary.get('hardware', 'n/a')}` ({base.summary.get('peak_source', 'n/a')} peak "
        f"{report.fmt(base.summary.get('peak_tflops'), '.3g')} TFLOP/s). Mean ± sample std "
        "over seeds; intervals are 95% t-intervals over the paired seed differences."
        + (f"\n\n**{note}**" if note else ""),
        "## Result\n\n" + text,
        "## Arms\n\n" + report.table(["arm", "params total / active", "train FLOPs/token", "tokens", "training FLOPs",
                                     "lr", "seeds", "final held-out loss", "tokens/s (median step)",
                                     "wall-clock s (incl. parent)"], rows),
        "## Paired gap, (b) - (a), final\n\n" + report.table(
            ["seed", "(a) loss", "(b) loss", "(b) - (a)"], [[s, f"{a:.4f}", f"{b:.4f}", f"{b - a:+.4f}"]
                                                             for s, a, b in pairs])
        + f"\n\nMean and 95% CI: {_ci(final_gap)} nats (n = {final_gap.n}).",
        "## Gap over training\n\n" + report.table(["step", "tokens", "mean (b) - (a)", "95% CI"], gap_rows)
        + f"\n\nTrend over the second half (least squares against log10 tokens): "
          + ("too few eval points." if tr["slope_per_decade"] is None else
             f"{tr['slope_per_decade']:+.4f} nats per decade of tokens; zero crossing predicted at "
             + ("no point (not heading to zero)" if tr["zero_at_tokens"] is None else
                f"{tr['zero_at_tokens']:,.3g} tokens") + "."),
        "## Speed-up to target (the paired dense run's final loss)\n\n" + report.table(
            ["arm", "seed", "target loss", "tokens needed", "x fewer tokens", "FLOPs needed", "x fewer FLOPs",
             "seconds needed", "x fewer seconds"], speed_rows),
        "## Router health (mean of the last 5 logged records; entropy max = ln E)\n\n" + report.table(
            ["arm", "load max/mean", "load CV", "router entropy", "ln E"], router_rows),
        "## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
    ]
    results = {
        "runs": [{"arm": r.arm.name, "seed": r.seed, "dir": r.result.run_dir.name,  # runs sit in the study folder
                  **({"init_from": r.parent.run_dir.name, "init_step": r.start_step} if r.parent else {})}
                 for r in runs],
        "primary": primary,
        "heldout_tokens": heldout,
        "arms": arm_data,
        "paired_gap": {"mean": final_gap.mean, "ci95": [final_gap.low, final_gap.high], "n": final_gap.n},
        "gap_over_training": over, "gap_trend": tr,
        "speedup_to_target": speed, "router": router,
        "curves": {f"{r.arm.name}_seed{r.seed}": vars(curve(r)) for r in runs},
        "figures": plots, "verdict": text,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return report.write_report(out / "report.md", sections)


def heldout_tokens(run) -> int:
    """Target tokens in the shared held-out batches (what every eval_loss averages over)."""
    from mixtral_jax.data.pipeline import make_eval_batches
    from mixtral_jax.data.tokenizer import load_or_train_tokenizer

    cfg = copy.deepcopy(run.cfg)
    if (run.run_dir / "tokenizer.model").is_file():
        cfg.data.tokenizer.path = str(run.run_dir / "tokenizer.model")
    batches = make_eval_batches(cfg.data, load_or_train_tokenizer(cfg.data, cfg.model.vocab_size),
                                cfg.train.eval_batches)
    return int(sum(float(b["loss_mask"].sum()) for b in batches))
