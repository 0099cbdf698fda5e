"""The arms of the dense_vs_moe study and one trained run of an arm: the definitions every part
of the study (training, report, plots, ladder, partial report) reads, kept apart from the
training code so those parts import this, not each other."""

from __future__ import annotations

from dataclasses import dataclass

from mixtral_jax.experiments.runner import RunResult

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
