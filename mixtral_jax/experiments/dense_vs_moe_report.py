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
from mixtral_jax.experiments.downstream_scores import METRICS
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


def _trend_line(tr: dict) -> str:
    if tr["slope_per_decade"] is None:
        return "Trend over the second half: too few eval points."
    low, high = tr["slope_ci95"]
    text = (f"Trend over the second half (least squares against log10 tokens): {tr['slope_per_decade']:+.4f} "
            "nats per decade of tokens" + ("" if low is None else f" (95% CI over seeds [{low:+.4f}, {high:+.4f}])"))
    if tr["zero_at_tokens"] is not None:
        text += f"; the fitted line crosses zero near {tr['zero_at_tokens']:,.3g} tokens"
    return text + "."


def _fmt_big(x: float | None, spec: str = ".3g") -> str:
    return "not reached" if x is None else format(x, spec)


def _downstream(arms: dict[str, list[ArmRun]], scores: dict[str, dict], primary: dict[str, str]
                ) -> tuple[str, dict, PairedGap | None]:
    """The shipped task's section, each arm's figures for results.json, and the paired accuracy gap
    (b) - (a) (None when the primary runs were not scored)."""
    def of(r: ArmRun) -> dict | None:
        return scores.get(r.result.run_dir.name)

    rows, data = [], {}
    for name, rs in arms.items():
        got = [(r, of(r)) for r in rs if of(r) is not None]
        if not got:
            continue
        first = got[0][1]
        data[name] = {"task": first["task"], "items": first["items"], "seeds": [r.seed for r, _ in got],
                      **{m: [x[m] for _, x in got] for m in METRICS},
                      **{f"{m}_stderr": [x[f"{m}_stderr"] for _, x in got] for m in METRICS}}
        stderr = [x["acc_stderr"] for _, x in got if x["acc_stderr"] is not None]
        rows.append([rs[0].arm.label, len(got), *(_ms(data[name][m], ".3f") for m in METRICS),
                     f"{statistics.fmean(stderr):.3f}" if stderr else "n/a",
                     f"{statistics.fmean(curve(r).loss[-1] for r, _ in got):.4f}"])
    if not data:
        return "", {}, None
    pairs = [(of(d), of(m)) for d in arms[primary["dense"]] for m in arms[primary["moe"]]
             if d.seed == m.seed and of(d) is not None and of(m) is not None]
    gap = paired_gap([a["acc"] for a, _ in pairs], [b["acc"] for _, b in pairs]) if pairs else None
    task, items = next(iter(data.values()))["task"], next(iter(data.values()))["items"]
    text = (f"## Downstream: `{task}` ({items} items, pick the true next line of a held-out Python file among "
            "4; chance 0.25)\n\n" + report.table(
                ["arm", "runs", "acc", "acc_norm", "binomial stderr of one run", "held-out loss (same runs)"], rows)
            + ("" if gap is None else f"\n\nPaired accuracy gap (b) - (a): {_ci(gap)} (n = {gap.n})."
               " Each run's own binomial stderr is the spread from the finite item set alone.")
            + "\n\nScored on each run's final weights (`mixtral_jax/experiments/downstream_scores.py`; "
              "`mixtral-jax eval --run DIR --tasks python_next_line` gives the same figures).")
    return text, data, gap


def write(out: Path, runs: Sequence[ArmRun], primary: dict[str, str], smoke: bool = False,
          note: str | None = None, downstream: dict[str, dict] | None = None) -> Path:
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
    down_text, down_data, down_gap = _downstream(arms, downstream or {}, primary)
    for name, figures in down_data.items():
        arm_data[name]["downstream"] = figures
    text = verdict(final_gap, over, tr, speed.get(primary["moe"], []), arm_data, primary, down_gap)

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
        + "\n\n" + _trend_line(tr),
        "## Speed-up to target (the paired dense run's final loss)\n\n" + report.table(
            ["arm", "seed", "target loss", "tokens needed", "x fewer tokens", "FLOPs needed", "x fewer FLOPs",
             "seconds needed", "x fewer seconds"], speed_rows),
        *([down_text] if down_text else []),
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
        "downstream_gap": None if down_gap is None else {"metric": "acc", "mean": down_gap.mean,
                                                          "ci95": [down_gap.low, down_gap.high], "n": down_gap.n},
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
