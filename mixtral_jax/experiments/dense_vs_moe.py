"""Experiment `dense_vs_moe`: "Mistral 7B vs Mixtral 8x7B" in miniature.

Three models share tokenizer, data order, trunk, optimizer and token budget: (a) dense, (b) the
same trunk with every FFN replaced by 8 experts top-2, (c) dense with the FFN widened to (b)'s
active parameters. Each trains with seeds 0 and 1 (the spread is reported). The report puts
the runs' own measured figures (from summary.json / metrics.jsonl) beside the same columns
computed analytically for the real Mistral 7B, Mixtral 8x7B and 70B-shape presets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mixtral_jax.config import load_config
from mixtral_jax.experiments import report
from mixtral_jax.experiments.runner import SMOKE, RunResult, experiment_config, train_run

NAME = "dense_vs_moe"
MODELS = {"dense": "(a) dense", "moe": "(b) 8 experts top-2", "dense_wide": "(c) dense, FFN x2 (active-matched)"}
SEEDS = (0, 1)
PRESETS = ("mistral_7b", "mixtral_8x7b", "llama2_70b_shape")
# The published-scale columns: 1e12 training tokens at seq 4096 on H100s at 40% MFU, $2/hour.
PLAN = dict(tokens=1e12, seq_len=4096, hardware="h100", mfu=0.4, price=2.0)


def _tokens(result: RunResult, steps: list[int]) -> list[float]:
    per_step = result.cfg.data.batch_size * result.cfg.data.seq_len
    return [s * per_step for s in steps]


def _eval_curve(result: RunResult) -> dict[str, list[float]]:
    """Held-out loss at each eval, against tokens, training FLOPs and training wall-clock."""
    steps, losses = result.series("eval_loss")
    clock = dict(zip(*result.series("device_hours")))
    tokens = _tokens(result, steps)
    flops = [t * result.summary["train_flops_per_token"] for t in tokens]
    # device_hours is logged with every record; on CPU one process counts as one device.
    seconds = [clock.get(s, float("nan")) * 3600.0 for s in steps]
    return {"tokens": tokens, "flops": flops, "seconds": seconds, "loss": losses}


def _measured_table(runs: dict[str, list[RunResult]]) -> str:
    rows = []
    for model, label in MODELS.items():
        seeds = runs[model]
        s0 = seeds[0].summary
        tokens_per_s = [_mean(r.series("tokens_per_s")[1]) for r in seeds]
        rows.append([
            label, f"{s0['params_total']:,}", f"{s0['params_active']:,}", f"{s0['train_flops_per_token']:.4g}",
            f"{s0['model_flops']:.4g}", report.pm([r.summary["device_hours"] for r in seeds], ".5f"),
            report.pm([r.summary["cost_usd"] for r in seeds], ".5f"), report.pm(tokens_per_s, ".0f"),
            report.pm([r.summary["eval_loss"] for r in seeds]), report.pm([r.summary["eval_ppl"] for r in seeds], ".2f"),
        ])
    headers = ["model", "params total", "params active", "train FLOPs/token", "training FLOPs", "device-hours",
               "cost $", "tokens/s", "held-out loss", "perplexity"]
    return report.table(headers, rows)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _analytic_table() -> str:
    from mixtral_jax.models.params import param_counts
    from mixtral_jax.training import cost

    peak, _ = cost.peak_tflops(PLAN["hardware"], None, "bfloat16")
    rows = []
    for preset in PRESETS:
        cfg = load_config(preset)
        counts = param_counts(cfg.model)
        plan = cost.plan_tokens(cfg.model, PLAN["seq_len"], PLAN["tokens"], peak, PLAN["mfu"], PLAN["price"], 1)
        rows.append([preset, f"{counts['total']:,}", f"{counts['active']:,}", f"{plan.train_flops_per_token:.4g}",
                     f"{plan.total_flops:.4g}", f"{plan.device_hours:,.0f}", f"{plan.cost_usd:,.0f}",
                     f"{plan.tokens / (plan.device_hours * 3600):,.0f}"])
    headers = ["preset", "params total", "params active", "train FLOPs/token", "FLOPs for 1e12 tokens",
               "H100-hours", "cost $", "tokens/s per H100"]
    return report.table(headers, rows)


def _verdict(spread: dict[str, tuple[float | None, float | None]]) -> str:
    """(b) against (a) and (c) at equal tokens, and whether the gap exceeds the seeds' spread."""
    if any(mean is None for mean, _ in spread.values()):
        return "No held-out loss was measured."
    lines = [f"Held-out loss at equal tokens: sparse (b) {spread['moe'][0]:.4f}, dense (a) {spread['dense'][0]:.4f}, "
             f"active-matched dense (c) {spread['dense_wide'][0]:.4f} nats/token."]
    for other, label in (("dense", "the dense base (a)"), ("dense_wide", "the active-matched dense (c)")):
        gap = spread[other][0] - spread["moe"][0]
        noise = spread[other][1] + spread["moe"][1]
        lines.append(f"(b) is {'lower' if gap > 0 else 'NOT lower'} than {label} by {gap:+.4f} nats; the two "
                     f"seeds' half-ranges add to {noise:.4f}, so the gap is "
                     f"{'larger than' if abs(gap) > noise else 'within'} the seed spread.")
    return " ".join(lines)


def _plots(runs: dict[str, list[RunResult]], out: Path) -> list[str]:
    fig, axes = report.figure(ncols=3, size=(5.0, 4.0))
    xs = (("tokens", "tokens seen"), ("flops", "training FLOPs"), ("seconds", "training wall-clock (s)"))
    colors = {"dense": "tab:blue", "moe": "tab:red", "dense_wide": "tab:green"}
    for ax, (key, label) in zip(axes[0], xs):
        for model, title in MODELS.items():
            for i, result in enumerate(runs[model]):
                curve = _eval_curve(result)
                ax.plot(curve[key], curve["loss"], color=colors[model], alpha=1.0 if i == 0 else 0.45,
                        linestyle="-" if i == 0 else "--", marker=".",
                        label=f"{title}, seed {result.cfg.run.seed}")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("dense vs sparse: held-out loss (solid: seed 0, dashed: seed 1)")
    return [report.save(fig, out / "loss_curves.png")]


def run(out: Path, smoke: bool = False, overrides: Sequence[str] = (), full_scale: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    extra = [*(SMOKE if smoke else []), *overrides]
    runs: dict[str, list[RunResult]] = {m: [] for m in MODELS}
    for seed in SEEDS:
        for model in MODELS:
            result = train_run(experiment_config(NAME, f"{model}.yaml", full_scale), [*extra, f"run.seed={seed}"], out,
                               f"{model}_seed{seed}")
            runs[model].append(result)
    plots = _plots(runs, out)
    base = runs["dense"][0]
    spread = {m: report.mean_spread([r.summary["eval_loss"] for r in runs[m]]) for m in MODELS}
    tokens = base.summary["tokens"]
    sections = [
        f"# dense_vs_moe{' (smoke)' if smoke else ''}",
        f"Three models trained on the same {tokens:,} tokens of the embedded corpus "
        f"(seq {base.cfg.data.seq_len}, batch {base.cfg.data.batch_size}, {base.cfg.train.steps} steps), "
        f"seeds {', '.join(map(str, SEEDS))} (mean ± half the range). Every figure comes from the runs' own "
        f"`summary.json` / `metrics.jsonl` under this folder; hardware `{base.summary['hardware']}` "
        f"({base.summary['peak_source']} peak {base.summary['peak_tflops']:.3g} TFLOP/s).",
        "## Measured (this machine)\n\n" + _measured_table(runs),
        f"Held-out unigram entropy (the loss of predicting token frequencies alone): "
        f"{base.summary['unigram_entropy']:.3f} nats/token.",
        "## Result\n\n" + _verdict(spread),
        "## The published scale, computed (not trained)\n\n"
        f"Same columns from the presets, for {PLAN['tokens']:.0e} tokens at seq {PLAN['seq_len']} on "
        f"{PLAN['hardware'].upper()} at {PLAN['mfu']:.0%} MFU and ${PLAN['price']}/device-hour "
        "(`mixtral-jax cost`):\n\n" + _analytic_table(),
        "Mixtral's claim in these terms: 46.7B parameters stored, 12.9B used per token, so a training token "
        "costs about a 13B dense model's FLOPs while the model holds 3.6x the parameters of Mistral 7B.",
        "## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
        "## Full scale\n\n`mixtral-jax experiment dense_vs_moe --full-scale` trains "
        "`experiments/dense_vs_moe/full_scale/{dense,moe,dense_wide}.yaml`: the real Mistral 7B / Mixtral 8x7B "
        "presets (and 7B with Mixtral's active FFN) on one mesh and token budget; check memory first with "
        "`mixtral-jax params --config FILE --mesh ... --device ...`.",
    ]
    return report.write_report(out / "report.md", sections)
