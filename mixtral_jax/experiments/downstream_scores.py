"""The shipped downstream task (`python_next_line`, downstream/tasks.py) scored on an experiment's
finished runs, so a study reports accuracy beside held-out loss for every arm.

Each run's final weights answer the task once; the figures are kept in the run directory
(`downstream.json`), keyed by the checkpoint step and the item limit, so a restarted experiment
reuses them and a retrained run is scored again. Scoring the final weights after training (rather
than `train.eval_tasks` during it) lets a study add the task to runs that are already finished."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from mixtral_jax.downstream.tasks import TASK
from mixtral_jax.training.checkpoint import complete_steps

FILE = "downstream.json"
METRICS = ("acc", "acc_norm")


def _cached(run_dir: Path, step: int, limit: int | None) -> dict[str, Any] | None:
    path = run_dir / FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return saved if saved.get("step") == step and saved.get("limit") == limit and saved.get("task") == TASK else None


@functools.cache
def _suite() -> Any:
    from mixtral_jax.downstream.harness import TaskSuite

    return TaskSuite.resolve([TASK])  # resolved once per process, not once per run


def score_run(run_dir: Path, limit: int | None = None) -> dict[str, Any]:
    """{"task", "step", "limit", "items", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr"} of the
    run's latest checkpoint on the shipped task (`limit` items, None = all); cached per step."""
    steps = complete_steps(run_dir / "checkpoints")
    if not steps:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to score")
    cached = _cached(run_dir, steps[-1], limit)
    if cached is not None:
        return cached
    from mixtral_jax.downstream.adapter import MixtralLM
    from mixtral_jax.downstream.harness import downstream_metrics
    from mixtral_jax.generate import load_tokenizer
    from mixtral_jax.training.evaluate import load_run_model

    print(f"[experiment] {TASK} on {run_dir.name}", flush=True)
    model, cfg, step = load_run_model(run_dir)
    results = _suite().evaluate(MixtralLM(model, load_tokenizer(run_dir, cfg), model_cfg=cfg.model), limit=limit)
    figures = downstream_metrics(results)  # downstream/<task>/<metric>, as training logs them
    scores = {"task": TASK, "step": step, "limit": limit, "items": int(results["n-samples"][TASK]["effective"])}
    for metric in METRICS:
        scores[metric] = figures[f"downstream/{TASK}/{metric}"]
        scores[f"{metric}_stderr"] = figures.get(f"downstream/{TASK}/{metric}_stderr")  # None if not computed
    tmp = run_dir / f"{FILE}.tmp"
    tmp.write_text(json.dumps(scores, indent=1) + "\n")
    tmp.replace(run_dir / FILE)  # never a half-written cache
    return scores


def score_runs(run_dirs: list[Path], limit: int | None = None) -> dict[str, dict[str, Any]]:
    """score_run for each run, by run directory name."""
    return {run_dir.name: score_run(run_dir, limit) for run_dir in run_dirs}
