"""Experiment `dense_vs_moe`: does a sparse model beat the dense model of equal ACTIVE compute?

Arms (each an ordinary config under experiments/dense_vs_moe/, same data order per seed, same
held-out rows, same token budget):
  (a) dense: FFN 512;
  (b) moe: 16 fine-grained experts of width 256, top-2 = (a)'s active FFN, 8x its FFN parameters;
  (c) dense_wide: dense with (b)'s total parameters (FFN 4,096): the memory-fair upper bound;
  (d) upcycled: (b)'s shape upcycled (granular slices) from (a)'s checkpoint at 50% of the budget
      and trained for the other 50% (the Mixtral-from-Mistral route).
The primary claim is (b) against (a), paired by seed; (c) and (d) run one seed (CPU budget).
Every finished run also answers the shipped downstream task (downstream_scores.py) for the report.
`--ladder` runs the scaling ladder instead (dense_vs_moe_ladder.py); the report and statistics
are in dense_vs_moe_report.py and paired_stats.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mixtral_jax.config import load_config
from mixtral_jax.experiments.downstream_scores import score_runs
from mixtral_jax.experiments.runner import SMOKE, RunResult, experiment_config, train_run

from mixtral_jax.experiments.dense_vs_moe_arms import (  # noqa: F401  (re-exported for callers)
    ARMS, NAME, PRIMARY, UPCYCLE_AT, UPCYCLE_DATA_SEED, Arm, ArmRun, train_arm_run)

SMOKE_TASK_ITEMS = 8  # --smoke scores this many items of the shipped task per run (the full set: 500)


def _train_upcycled(arm: Arm, seed: int, parent: RunResult, extra: list[str], out: Path,
                    full_scale: bool) -> tuple[RunResult, int]:
    """Upcycle `parent` at UPCYCLE_AT of its steps (granular when the experts are narrower than its
    FFN) and train this arm's config from there for the rest of the budget."""
    from mixtral_jax.interop.upcycle import upcycle

    steps = parent.cfg.train.steps
    start = max(1, round(steps * UPCYCLE_AT))
    config = experiment_config(NAME, arm.config if not full_scale else "moe.yaml", full_scale)
    moe_cfg = load_config(config, extra)
    init = out / f"{arm.name}_init_seed{seed}"
    if not (init / "config.yaml").is_file():
        shape = [f"model.moe.{k}={v}" for k, v in (("num_experts", moe_cfg.model.moe.num_experts),
                                                     ("top_k", moe_cfg.model.moe.top_k),
                                                     ("expert_hidden_dim", moe_cfg.model.expert_width))]
        granular = moe_cfg.model.expert_width != parent.cfg.model.hidden_dim
        upcycle(parent.run_dir, init, shape, granular=granular, step=start)
    rest = steps - start
    overrides = [*extra, f"train.init_from={init}", f"train.steps={rest}",
                 f"train.eval_every={max(1, parent.cfg.train.eval_every * rest // steps)}",
                 f"train.checkpoint_every={rest}", f"run.seed={UPCYCLE_DATA_SEED + seed}"]
    return train_run(config, overrides, out, f"{arm.name}_seed{seed}"), start


def train_arms(out: Path, smoke: bool, overrides: Sequence[str], full_scale: bool,
               arms: Sequence[Arm] = ARMS) -> list[ArmRun]:
    """Every run, primary pairs first (seed by seed), then the single-seed arms, so a study cut
    short still has the primary comparison."""
    extra = [*(SMOKE if smoke else []), *overrides]
    if full_scale:
        arms = [a for a in arms if a.full_scale or a.upcycle_from]
    # full scale: one seed per arm (accelerator budget); smoke: two, the fewest a paired interval needs
    keep = 1 if full_scale else 2 if smoke else None
    by_seed = sorted({(s, i) for i, a in enumerate(arms) for s in a.seeds[:keep]},
                     key=lambda p: (len(arms[p[1]].seeds) == 1, p[0], p[1]))
    done: dict[tuple[str, int], RunResult] = {}
    runs = []
    for seed, i in by_seed:
        arm = arms[i]
        if arm.upcycle_from:
            parent = done[(arm.upcycle_from, seed)]
            result, start = _train_upcycled(arm, seed, parent, extra, out, full_scale)
            runs.append(ArmRun(arm, seed, result, parent, start))
        else:
            runs.append(ArmRun(arm, seed, train_arm_run(arm, seed, extra, out, full_scale)))
        done[(arm.name, seed)] = runs[-1].result
    return runs


def run(out: Path, smoke: bool = False, overrides: Sequence[str] = (), full_scale: bool = False,
        ladder: bool = False) -> Path:
    if ladder:
        from mixtral_jax.experiments import dense_vs_moe_ladder

        return dense_vs_moe_ladder.run(out, smoke=smoke, overrides=overrides, h100=full_scale)
    from mixtral_jax.experiments import dense_vs_moe_report

    out.mkdir(parents=True, exist_ok=True)
    runs = train_arms(out, smoke, overrides, full_scale)
    scores = score_runs([r.result.run_dir for r in runs], limit=SMOKE_TASK_ITEMS if smoke else None)
    return dense_vs_moe_report.write(out, runs, PRIMARY, smoke=smoke, downstream=scores)
