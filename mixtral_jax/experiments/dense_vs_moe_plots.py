"""dense_vs_moe's figures: held-out loss against tokens / FLOPs / seconds (log x, every seed),
the paired gap over training with its interval, and per-layer expert-load heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixtral_jax.experiments import report
from mixtral_jax.experiments.dense_vs_moe_arms import ArmRun
from mixtral_jax.experiments.dense_vs_moe_curves import curve

COLORS = {"dense": "tab:blue", "moe": "tab:red", "dense_wide": "tab:green", "upcycled": "tab:purple"}


def heatmaps(arms: dict[str, list[ArmRun]], out: Path) -> str | None:
    shown = [runs[0] for runs in arms.values() if runs[0].result.cfg.model.is_moe and
             runs[0].result.series("moe/expert_load")[1]]
    if not shown:
        return None
    layers = shown[0].result.cfg.model.n_layers
    fig, axes = report.figure(ncols=layers, nrows=len(shown), size=(2.8, 3.0))
    loads = [np.asarray(r.result.series("moe/expert_load")[1]) for r in shown]  # [records, layers, E]
    vmax = max(float(v.max()) for v in loads)
    for row, (r, load) in enumerate(zip(shown, loads)):
        steps = [r.start_step + s for s in r.result.series("moe/expert_load")[0]]
        for layer in range(layers):
            ax = axes[row][layer]
            image = ax.imshow(load[:, layer, :], aspect="auto", cmap="magma", vmin=0, vmax=vmax,
                              extent=(-0.5, load.shape[-1] - 0.5, steps[-1], steps[0]))
            ax.set_title(f"{r.arm.name} seed {r.seed}: layer {layer}", fontsize=8)
            ax.set_xlabel("expert")
            if layer == 0:
                ax.set_ylabel("step")
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of routed token-slots")
    fig.suptitle(f"expert load (uniform = {1 / loads[0].shape[-1]:.4f})", fontsize=9)
    return report.save(fig, out / "load_heatmaps.png")


def curve_plot(arms: dict[str, list[ArmRun]], out: Path) -> str:
    fig, axes = report.figure(ncols=3, size=(5.2, 4.2))
    xs = (("tokens", "tokens seen"), ("flops", "training FLOPs"), ("seconds", "training wall-clock (s)"))
    styles = ("-", "--", ":", "-.")
    for ax, (key, label) in zip(axes[0], xs):
        for name, runs in arms.items():
            for i, r in enumerate(runs):
                c = curve(r)
                ax.plot(getattr(c, key), c.loss, color=COLORS.get(name, "black"), linestyle=styles[i % 4],
                        marker=".", alpha=0.9, label=f"{r.arm.label}, seed {r.seed}")
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=6)
    fig.suptitle("held-out loss; every seed drawn (line style = seed)")
    return report.save(fig, out / "loss_curves.png")


def gap_plot(rows: list[dict], dense: list[ArmRun], moe: list[ArmRun], out: Path) -> str:
    fig, axes = report.figure(size=(6.5, 4.2))
    ax = axes[0][0]
    for d in dense:
        for m in moe:
            if d.seed == m.seed:
                cd, cm = curve(d), curve(m)
                shared = [s for s in cd.steps if s in cm.steps]
                ax.plot([cd.tokens[cd.steps.index(s)] for s in shared],
                        [cm.loss[cm.steps.index(s)] - cd.loss[cd.steps.index(s)] for s in shared],
                        color="gray", alpha=0.6, linewidth=0.8, label=f"seed {d.seed}")
    tokens = [r["tokens"] for r in rows]
    ax.plot(tokens, [r["mean"] for r in rows], color="tab:red", marker="o", label="mean over seeds")
    if rows and rows[0]["low"] is not None:
        ax.fill_between(tokens, [r["low"] for r in rows], [r["high"] for r in rows], color="tab:red", alpha=0.2,
                        label="95% CI (t, paired)")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("tokens seen (log)")
    ax.set_ylabel("MoE - dense held-out loss (nats; < 0: MoE better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.suptitle("paired gap over training")
    return report.save(fig, out / "gap_over_training.png")


