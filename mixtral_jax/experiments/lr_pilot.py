"""The learning-rate pilot behind dense_vs_moe's per-arm `optim.lr`: a few short runs per arm,
scored by TRAINING loss only (the held-out set is switched off), so the study's held-out
numbers play no part in choosing any setting.

    python -m mixtral_jax.experiments.lr_pilot --out runs/dense_vs_moe_pilot [--steps 150]

Each batch is seen once (the corpus is larger than a run), so the training loss near the end of
a short run measures the same thing as a held-out loss would, on the same batches for every
learning rate (one data order: seed 0), which makes the comparison paired.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Sequence

from mixtral_jax.experiments import report
from mixtral_jax.experiments.runner import RunResult, experiment_config, train_run

# arm config -> the learning rates tried (around the quickstart's 3e-3; the 8x wider dense arm
# gets fewer, lower points: it costs the most per step and wide layers usually want less).
GRID = {
    "dense.yaml": (1.5e-3, 3e-3, 6e-3),
    "moe_fine.yaml": (1.5e-3, 3e-3, 6e-3),
    "dense_wide.yaml": (1.5e-3, 3e-3),
}
TAIL = 5  # score: mean training lm_loss of the last TAIL logged records (the last 5 x log_every steps)
# Within this many nats of the best, the LOWER learning rate is chosen: the study's runs are
# several times longer than the pilot's, and the best learning rate falls as runs get longer.
TIE = 0.01


def choose(scores: dict[float, float]) -> float:
    best = min(scores.values())
    return min(lr for lr, s in scores.items() if s <= best + TIE)


def score(result: RunResult) -> float:
    return statistics.fmean(result.series("lm_loss")[1][-TAIL:])


def run(out: Path, steps: int, grid: dict[str, Sequence[float]] = GRID, extra: Sequence[str] = ()) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows, best = [], {}
    for config, lrs in grid.items():
        scores = {}
        for lr in lrs:
            result = train_run(experiment_config("dense_vs_moe", config),
                               [f"train.steps={steps}", "train.eval_batches=0", f"train.eval_every={steps}",
                                f"train.checkpoint_every={steps}", f"optim.lr={lr}", "run.seed=0", *extra],
                               out, f"{config.removesuffix('.yaml')}_lr{lr:g}")
            scores[lr] = score(result)
            rows.append([config, f"{lr:g}", scores[lr], statistics.median(result.series("tokens_per_s")[1])])
        best[config] = choose(scores)
    text = [f"# dense_vs_moe learning-rate pilot: {steps} steps per run, seed 0",
            f"Score: mean training lm_loss over the last {TAIL} logged records (no held-out data used); "
            f"within {TIE} nats of the best, the lower learning rate is chosen.",
            report.table(["config", "lr", "training loss", "tokens/s"], rows),
            "Chosen: " + ", ".join(f"{c} lr {lr:g}" for c, lr in best.items())]
    return report.write_report(out / "pilot.md", text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dense_vs_moe_pilot")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("overrides", nargs="*", help="config overrides for every pilot run")
    args = parser.parse_args(argv)
    print(run(Path(args.out), args.steps, extra=args.overrides).read_text())


if __name__ == "__main__":
    main()
