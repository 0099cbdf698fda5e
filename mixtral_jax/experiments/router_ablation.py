"""Experiment `router_ablation`: how the router balances load, and what balance costs.

Every point is the quickstart MoE (experiments/router_ablation/base.yaml) with one change. The
default grid varies one factor at a time around the default (11 runs, about 45 minutes on two
CPU cores); `--full` runs the whole product (4 aux x 2 z x 4 routers x 4 dispatch = 128 runs,
for a GPU). Each point is also an ordinary run: `mixtral-jax train --config
experiments/router_ablation/base.yaml <its overrides>`.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import numpy as np

from mixtral_jax.experiments import report
from mixtral_jax.experiments.runner import SMOKE, RunResult, experiment_config, train_run

NAME = "router_ablation"
AUX = ("0", "1e-3", "1e-2", "1e-1")
Z = ("0", "1e-3")
# The study's arms (config overrides per arm), not the registries of config/choices.py.
ROUTER_ARMS = {"topk_softmax": [], "softmax_topk": ["model.moe.router=softmax_topk"],
               "expert_choice": ["model.moe.router=expert_choice"],
               "loss_free": ["model.moe.aux_loss_coef=0", "model.moe.bias_update_rate=1e-3"],
               # DeepSeek-V3: sigmoid scores, renormalised, loss-free bias re-centred, no aux loss
               "deepseek_v3": ["model.moe.router=sigmoid_topk", "model.moe.renormalize=true",
                               "model.moe.aux_loss_coef=0", "model.moe.bias_update_rate=1e-3",
                               "model.moe.bias_recenter=true"],
               # DeepSeekMoE / Qwen2-MoE: one shared expert of the routed experts' width beside them
               "shared_expert": ["model.moe.shared_experts=1"]}
# Left out of the default grid to keep its CPU budget; in the full grid, and one line to add here.
OPTIONAL_ARMS = ("deepseek_v3", "shared_expert")
DISPATCH_ARMS = {"dropless": [], **{f"capacity{f}": ["model.moe.dispatch=capacity", f"model.moe.capacity_factor={f}"]
                                    for f in ("1.0", "1.25", "2.0")}}
# one factor at a time around the default (aux 1e-2, z 1e-3, topk_softmax, dropless)
DEFAULT_GRID: dict[str, list[str]] = {
    "default": [],
    **{f"aux{a}": [f"model.moe.aux_loss_coef={a}"] for a in AUX if a != "1e-2"},
    "z0": ["model.moe.z_loss_coef=0"],
    **{r: o for r, o in ROUTER_ARMS.items() if r != "topk_softmax" and r not in OPTIONAL_ARMS},
    **{d: o for d, o in DISPATCH_ARMS.items() if d != "dropless"},
}
SMOKE_GRID = ("default", "aux0", "loss_free", "expert_choice", "capacity1.0")
HEATMAPS = ("aux0", "default")  # no balancing vs the default
FINAL_WINDOW = 5  # router metrics: mean of the last 5 logged records (the end of training)


def full_grid() -> dict[str, list[str]]:
    grid = {}
    for aux, z, (router, r_o), (dispatch, d_o) in itertools.product(AUX, Z, ROUTER_ARMS.items(), DISPATCH_ARMS.items()):
        aux_o = [] if router in ("loss_free", "deepseek_v3") else [f"model.moe.aux_loss_coef={aux}"]
        grid[f"aux{aux}_z{z}_{router}_{dispatch}"] = [*aux_o, f"model.moe.z_loss_coef={z}", *r_o, *d_o]
    return grid


def _tail_mean(result: RunResult, key: str) -> float | None:
    values = result.series(key)[1][-FINAL_WINDOW:]
    return float(np.mean(values)) if values else None


def _row(name: str, overrides: list[str], r: RunResult) -> list:
    return [name, " ".join(o.replace("model.moe.", "") for o in overrides) or "(default)", r.summary["eval_loss"],
            _tail_mean(r, "moe/load_max_over_mean"), _tail_mean(r, "moe/load_cv"),
            _tail_mean(r, "moe/dropped_fraction"), _tail_mean(r, "moe/router_entropy"),
            _tail_mean(r, "tokens_per_s")]


def _heatmaps(runs: dict[str, RunResult], out: Path) -> str:
    shown = [n for n in HEATMAPS if n in runs]
    layers = runs[shown[0]].cfg.model.n_layers
    fig, axes = report.figure(ncols=layers, nrows=len(shown), size=(2.6, 3.2))
    loads = {n: np.asarray(runs[n].series("moe/expert_load")[1]) for n in shown}  # [records, layers, E]
    vmax = max(float(v.max()) for v in loads.values())
    for row, name in enumerate(shown):
        steps = runs[name].series("moe/expert_load")[0]
        for layer in range(layers):
            ax = axes[row][layer]
            image = ax.imshow(loads[name][:, layer, :], aspect="auto", cmap="magma", vmin=0, vmax=vmax,
                              extent=(-0.5, loads[name].shape[-1] - 0.5, steps[-1], steps[0]))
            ax.set_title(f"{name}: layer {layer}", fontsize=9)
            ax.set_xlabel("expert")
            if layer == 0:
                ax.set_ylabel("step")
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of routed token-slots")
    fig.suptitle(f"expert load over training (uniform = {1 / loads[shown[0]].shape[-1]:.3f})")
    return report.save(fig, out / "load_heatmaps.png")


def _loss_vs_imbalance(rows: list[list], out: Path) -> str:
    fig, axes = report.figure(size=(6.5, 4.5))
    ax = axes[0][0]
    for row in rows:
        if row[2] is None or row[3] is None:
            continue
        ax.scatter(row[3], row[2], color="tab:red" if row[0] == "default" else "tab:blue")
        ax.annotate(row[0], (row[3], row[2]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("load max / mean (end of training; 1 = balanced)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.set_title("loss vs load imbalance")
    return report.save(fig, out / "loss_vs_imbalance.png")


def run(out: Path, smoke: bool = False, overrides: Sequence[str] = (), full: bool = False,
        full_scale: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    grid = full_grid() if full else DEFAULT_GRID
    if smoke:
        grid = {k: DEFAULT_GRID[k] for k in SMOKE_GRID}
    extra = [*(SMOKE if smoke else []), *overrides]
    runs = {name: train_run(experiment_config(NAME, "base.yaml", full_scale), [*extra, *point], out, name)
            for name, point in grid.items()}
    rows = [_row(name, grid[name], r) for name, r in runs.items()]
    headers = ["point", "change", "held-out loss", "load max/mean", "load CV", "dropped fraction",
               "router entropy", "tokens/s"]
    plots = [_heatmaps(runs, out), _loss_vs_imbalance(rows, out)]
    base = runs["default"] if "default" in runs else next(iter(runs.values()))
    imbalance = {n: _tail_mean(runs[n], "moe/load_max_over_mean") for n in ("aux0", "default") if n in runs}
    finding = "n/a"
    if len(imbalance) == 2 and None not in imbalance.values():
        higher = imbalance["aux0"] > imbalance["default"]
        finding = (f"Without balancing (aux 0) load max/mean ends at {imbalance['aux0']:.3f} vs "
                   f"{imbalance['default']:.3f} with aux_loss_coef=1e-2: imbalance is "
                   f"{'higher' if higher else 'NOT higher'} without the loss.")
    sections = [
        f"# router_ablation{' (smoke)' if smoke else ''}{' (full grid)' if full else ''}",
        f"{len(runs)} runs of {base.cfg.train.steps} steps ({base.summary['tokens']:,} tokens each), seed "
        f"{base.cfg.run.seed}, from `experiments/router_ablation/base.yaml`; each row changes one setting. Router "
        f"columns are means of the last {FINAL_WINDOW} logged records of each run's metrics.jsonl; held-out loss "
        "is its summary.json. Expert choice balances by construction (load max/mean 1) but looks at the whole "
        "batch, future tokens included, to pick; capacity rows drop token-slots over capacity.",
        "## Results\n\n" + report.table(headers, rows),
        "## Finding\n\n" + finding,
        "## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
        "## Full grid\n\n`mixtral-jax experiment router_ablation --full` runs aux_loss_coef in {0, 1e-3, 1e-2, "
        "1e-1} x z_loss_coef in {0, 1e-3} x router in {topk_softmax, softmax_topk, expert_choice, loss-free bias, DeepSeek-V3, a shared "
        "expert} x dispatch in {dropless, capacity 1.0 / 1.25 / 2.0}: 192 runs (sized for a GPU).",
    ]
    return report.write_report(out / "report.md", sections)
