"""The arms of the dense_vs_moe study, one trained run of an arm, and how one seed of an arm is
trained: what every part of the study (training, report, plots, ladder, partial report) reads,
kept apart so those parts import this, not each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mixtral_jax.config import load_config
from mixtral_jax.experiments.runner import RunResult, experiment_config, train_run

NAME = "dense_vs_moe"
UPCYCLE_AT = 0.5  # (d) starts from (a)'s checkpoint at this fraction of the step budget
UPCYCLE_DATA_SEED = 100  # (d)'s second half draws batches with run.seed = this + seed (fresh order)


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    config: str                   # file under experiments/dense_vs_moe/
    seeds: tuple[int, ...]
    full_scale: str | None = None  # its twin under full_scale/ (None: not trained at full scale)
    upcycle_from: str | None = None  # the dense arm whose UPCYCLE_AT checkpoint this arm starts from


ARMS = (
    Arm("dense", "(a) dense, FFN 512", "dense.yaml", (0, 1, 2), "dense.yaml"),
    Arm("moe", "(b) 16 experts x 256, top-2", "moe_fine.yaml", (0, 1, 2), "moe.yaml"),
    Arm("upcycled", "(d) (b) upcycled from (a) at 50%", "upcycled.yaml", (0,), None, upcycle_from="dense"),
    Arm("dense_wide", "(c) dense, FFN 4096 (= (b)'s total)", "dense_wide.yaml", (0,), "dense_wide.yaml"),
)
PRIMARY = {"dense": "dense", "moe": "moe"}


@dataclass
class ArmRun:
    """One trained run of an arm. For an upcycled arm, `parent` is the dense run it started from
    and `start_step` the parent's step it continued at (its curve is offset by that much)."""

    arm: Arm
    seed: int
    result: RunResult
    parent: RunResult | None = None
    start_step: int = 0


def train_arm_run(arm: Arm, seed: int, extra: Sequence[str], out: Path, full_scale: bool = False) -> RunResult:
    """Train (or reuse) one seed of a trained-from-scratch arm as `out/<arm>_seed<seed>` (the
    ladder's middle size reuses the primary arms' runs through this too)."""
    config = experiment_config(NAME, arm.full_scale if full_scale else arm.config, full_scale)
    steps = load_config(config, extra).train.steps
    # a checkpoint exactly where an upcycled arm starts (the run's cadence may not hit it)
    ckpt = [f"train.checkpoint_every={max(1, round(steps * UPCYCLE_AT))}", "train.keep_checkpoints=3"]
    return train_run(config, [*extra, *ckpt, f"run.seed={seed}"], out, f"{arm.name}_seed{seed}")
