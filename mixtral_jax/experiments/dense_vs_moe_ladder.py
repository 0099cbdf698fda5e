"""dense_vs_moe's scaling ladder (`--ladder`): three widths, each dense and as 16 fine-grained
experts top-2 of the same active FFN, seeds 0 and 1, one token budget. Per size it reports the
compute multiplier: how many times the MoE's training FLOPs the dense model needs to reach the
MoE's final held-out loss, read off the dense eval curve (> 1: the MoE is ahead; < 1: behind).
Plotted against active parameters and tokens per active parameter, to see whether the sparse
advantage appears, and grows, with size or with training length.
Configs: experiments/dense_vs_moe/ladder/ (CPU, about 100 min) and ladder_h100/ (--full-scale)."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Sequence

from mixtral_jax.experiments import report
from mixtral_jax.experiments.dense_vs_moe_arms import ARMS, PRIMARY, Arm, ArmRun, train_arm_run
from mixtral_jax.experiments.dense_vs_moe_curves import curve
from mixtral_jax.experiments.paired_stats import compute_multiplier, extrapolated_multiplier, paired_gap
from mixtral_jax.experiments.runner import SMOKE, experiment_config, train_run

SIZES = ("s", "m", "l")
STUDY_SIZE = "m"  # the CPU ladder's middle size is the study's (a) and (b): their runs are reused
SEEDS = (0, 1)


def _train(out: Path, folder: str, smoke: bool, overrides: Sequence[str]) -> dict[str, dict[str, list[ArmRun]]]:
    extra = [*(SMOKE if smoke else []), *overrides]
    runs: dict[str, dict[str, list[ArmRun]]] = {s: {"dense": [], "moe": []} for s in SIZES}
    for seed in SEEDS[:1] if smoke else SEEDS:  # seed by seed: a ladder cut short has one whole seed
        for size in SIZES:
            for kind in ("dense", "moe"):
                if folder == "ladder" and size == STUDY_SIZE:
                    # the study's primary arms are this size's runs: trained once, in the study's folder
                    study_arm = next(a for a in ARMS if a.name == PRIMARY[kind])
                    arm = Arm(f"{size}_{kind}", f"{size} {kind}", study_arm.config, SEEDS)
                    result = train_arm_run(study_arm, seed, extra, out.parent)
                else:
                    arm = Arm(f"{size}_{kind}", f"{size} {kind}", f"{folder}/{size}_{kind}.yaml", SEEDS)
                    result = train_run(experiment_config("dense_vs_moe", arm.config), [*extra, f"run.seed={seed}"],
                                       out, f"{arm.name}_seed{seed}")
                runs[size][kind].append(ArmRun(arm, seed, result))
    return runs


def _size_row(size: str, dense: list[ArmRun], moe: list[ArmRun]) -> dict:
    d0 = dense[0].result.summary
    m0 = moe[0].result.summary
    tokens = curve(moe[0]).tokens[-1]
    multipliers, above, extrapolated = [], [], []
    for d, m in zip(dense, moe):
        cd, cm = curve(d), curve(m)
        multipliers.append(compute_multiplier(cd.flops, cd.loss, cm.flops[-1], cm.loss[-1]))
        # the MoE ends below every dense point: the multiplier exceeds what the dense run spent,
        # and the dense curve's log-linear tail gives an estimate of by how much
        above.append(cd.flops[-1] / cm.flops[-1] if multipliers[-1] is None else None)
        guess = None if multipliers[-1] is not None else extrapolated_multiplier(cd.flops, cd.loss, cm.flops[-1],
                                                                                 cm.loss[-1])
        # never below what the dense run itself measured (its fitted line can sit under its last point)
        extrapolated.append(None if guess is None else max(guess, above[-1]))
    gap = paired_gap([d.result.summary["eval_loss"] for d in dense], [m.result.summary["eval_loss"] for m in moe])
    known = [x for x in multipliers if x is not None]
    estimates = [x if x is not None else e for x, e in zip(multipliers, extrapolated)]
    return {"size": size, "dim": dense[0].result.cfg.model.dim, "dense_params": d0["params_active"],
            "moe_params_total": m0["params_total"], "moe_params_active": m0["params_active"], "tokens": tokens,
            "tokens_per_active_param": tokens / m0["params_active"],
            "dense_loss": statistics.fmean(d.result.summary["eval_loss"] for d in dense),
            "moe_loss": statistics.fmean(m.result.summary["eval_loss"] for m in moe),
            "gap_mean": gap.mean, "gap_ci95": [gap.low, gap.high], "multipliers": multipliers,
            "multiplier_above": above, "multiplier_extrapolated": extrapolated,
            "multiplier_with_extrapolated_mean": (statistics.fmean(estimates) if None not in estimates else None),
            "multiplier_mean": statistics.fmean(known) if known else None}


def _plot(rows: list[dict], out: Path) -> str:
    fig, axes = report.figure(ncols=2, size=(5.0, 4.0))
    for ax, key, label in ((axes[0][0], "moe_params_active", "active parameters"),
                           (axes[0][1], "tokens_per_active_param", "training tokens per active parameter")):
        shown = set()
        for row in rows:
            measured = [m for m in row["multipliers"] if m is not None]
            guessed = [e for e in row["multiplier_extrapolated"] if e is not None]
            for ys, style, name in ((measured, {"marker": "o"}, "per seed, measured on the dense curve"),
                                    (guessed, {"marker": "^", "facecolors": "none"},
                                     "per seed, extrapolated (MoE below every dense point)")):
                if ys:
                    ax.scatter([row[key]] * len(ys), ys, color="tab:red", alpha=0.6,
                               label=None if name in shown else name, **style)
                    shown.add(name)
            if row["multiplier_with_extrapolated_mean"] is not None:
                ax.annotate(row["size"], (row[key], row["multiplier_with_extrapolated_mean"]), fontsize=9)
        means = [(r[key], r["multiplier_with_extrapolated_mean"]) for r in rows
                 if r["multiplier_with_extrapolated_mean"] is not None]
        if means:
            ax.plot(*zip(*means), color="tab:red", label="mean over seeds")
        ax.axhline(1.0, color="black", linewidth=0.8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("compute multiplier (dense / MoE FLOPs)")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("scaling ladder: dense FLOPs to reach the MoE's final loss / the MoE's FLOPs (> 1: the MoE is ahead)")
    return report.save(fig, out / "ladder_multiplier.png")


def _per_seed(r: dict) -> str:
    cells = []
    for m, bound, guess in zip(r["multipliers"], r["multiplier_above"], r["multiplier_extrapolated"]):
        if m is not None:
            cells.append(f"{m:.2f}")
        else:
            cells.append(f"> {bound:.2f}" + ("" if guess is None else f" (~{guess:.2f} extrapolated)"))
    return ", ".join(cells)


def _trend_text(rows: list[dict]) -> str:
    """What the ladder shows, from its numbers: the gap and the multiplier from the smallest size
    (most tokens per parameter) to the largest (fewest)."""
    gaps = " -> ".join(f"{r['gap_mean']:+.4f} ({r['size']}, {r['tokens_per_active_param']:.1f} tokens per active "
                       f"parameter)" for r in rows)
    text = f"Paired gap MoE - dense from the smallest size to the largest: {gaps}."
    means = [r["multiplier_with_extrapolated_mean"] for r in rows]
    if None not in means:
        steps = [b - a for a, b in zip(means, means[1:])]
        shape = ("rises with every step up" if all(d > 0 for d in steps) else
                 "falls with every step up" if all(d < 0 for d in steps) else "is not monotone in size")
        text += (" The compute multiplier (extrapolated where marked) goes "
                 + " -> ".join(f"{m:.2f}" for m in means) + f": it {shape} the ladder.")
    else:
        text += " The compute multiplier is not measurable at every size."
    return text + (" One token budget for every size: size and tokens per parameter change together, so the "
                   "ladder cannot tell them apart.")


def run(out: Path, smoke: bool = False, overrides: Sequence[str] = (), h100: bool = False) -> Path:
    """Train (or reuse) the ladder under out/ladder (out/ladder_h100), so it never overwrites the
    study's own report in out/, and write its report.md, PNG and results.json there."""
    folder = "ladder_h100" if h100 else "ladder"
    out = out / folder
    out.mkdir(parents=True, exist_ok=True)
    runs = _train(out, folder, smoke, overrides)
    rows = [_size_row(s, runs[s]["dense"], runs[s]["moe"]) for s in SIZES]
    plot = _plot(rows, out)
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}"  # noqa: E731
    table = report.table(
        ["size", "dim", "dense params", "MoE total / active", "tokens", "tokens / active param", "dense loss",
         "MoE loss", "paired gap MoE - dense [95% CI]", "multiplier per seed", "multiplier mean"],
        [[r["size"], r["dim"], f"{r['dense_params']:,}", f"{r['moe_params_total']:,} / {r['moe_params_active']:,}",
          f"{r['tokens']:,.0f}", f"{r['tokens_per_active_param']:.2f}", f"{r['dense_loss']:.4f}",
          f"{r['moe_loss']:.4f}", f"{r['gap_mean']:+.4f} " + ("[n/a]" if r["gap_ci95"][0] is None else
                                                             f"[{r['gap_ci95'][0]:+.4f}, {r['gap_ci95'][1]:+.4f}]"),
          _per_seed(r), fmt(r["multiplier_with_extrapolated_mean"])
          + (" (incl. extrapolated)" if any(e is not None for e in r["multiplier_extrapolated"]) else "")]
         for r in rows])
    sections = [
        f"# dense_vs_moe scaling ladder{' (smoke)' if smoke else ''} ({folder})",
        f"Per size: dense against 16 experts top-2 of equal active FFN, seeds "
        f"{', '.join(str(r.seed) for r in runs[SIZES[0]]['dense'])}. "
        "Compute multiplier = dense training FLOPs needed (interpolated on the dense held-out curve) to reach "
        "the MoE's final held-out loss, over the MoE's training FLOPs. Where the MoE ends below every dense eval "
        "point the multiplier exceeds the dense run's own FLOPs over the MoE's ('> x'); the estimate beside it "
        "extends the dense curve's second half as a line in log FLOPs (an extrapolation, drawn as open triangles).",
        table,
        _trend_text(rows),
        f"![{plot}]({plot})",
    ]
    results = {"runs": [{"arm": r.arm.name, "seed": r.seed, "dir": os.path.relpath(r.result.run_dir, out)}
                        for s in SIZES for k in ("dense", "moe") for r in runs[s][k]],
               "primary": {"dense": f"{SIZES[-1]}_dense", "moe": f"{SIZES[-1]}_moe"},
               "sizes": rows, "figures": [plot]}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return report.write_report(out / "report.md", sections)
