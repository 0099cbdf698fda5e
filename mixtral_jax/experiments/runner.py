"""Running the training runs of an experiment: each run is an ordinary `mixtral-jax train` run
(its own run dir with config.yaml, metrics.jsonl, summary.json) under the experiment's folder.
A run whose summary.json already records the requested steps is reused, so an interrupted
sweep picks up where it stopped and any point can be launched alone with `mixtral-jax train`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mixtral_jax.config import Config, load_config

# The experiments' configs live beside the package in the repository, like configs/.
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent.parent / "experiments"

# Shrinks any experiment run to a seconds-long end-to-end check (`--smoke`).
SMOKE = ["model.n_layers=1", "data.seq_len=32", "data.batch_size=8", "train.steps=4", "train.eval_every=2",
         "train.log_every=1", "train.eval_batches=1", "train.checkpoint_every=4", "optim.warmup_steps=1",
         "logging.progress=false", "logging.wandb=off"]


@dataclass
class RunResult:
    name: str
    cfg: Config
    summary: dict
    metrics: list[dict]

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of every logged record that has `key`."""
        rows = [(r["step"], r[key]) for r in self.metrics if key in r]
        return [s for s, _ in rows], [v for _, v in rows]

    def final(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[-1] if values else None


def experiment_config(experiment: str, name: str, full_scale: bool = False) -> Path:
    """experiments/EXPERIMENT/NAME, or its accelerator-sized twin in full_scale/."""
    return EXPERIMENTS_DIR / experiment / ("full_scale" if full_scale else "") / name


def train_run(config: str | Path, overrides: Sequence[str], out_dir: Path, name: str) -> RunResult:
    """Train (or reuse) run `name` under out_dir from `config` + overrides."""
    from mixtral_jax.training.metrics import read_metrics
    from mixtral_jax.training.trainer import Trainer

    cfg = load_config(config, [*overrides, f"run.out_dir={out_dir}", f"run.name={name}"])
    summary_file = cfg.run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    if summary is None or summary.get("steps") != cfg.train.steps:
        print(f"[experiment] training {name} ({cfg.train.steps} steps) in {cfg.run_dir}", flush=True)
        summary = Trainer(cfg).fit()
        if summary.get("stopped_by"):  # Ctrl-C / SIGTERM: the run saved a checkpoint; stop the whole
            raise KeyboardInterrupt   # experiment (rerunning it resumes this run)
    else:
        print(f"[experiment] reusing finished run {cfg.run_dir}", flush=True)
    return RunResult(name, cfg, summary, read_metrics(cfg.run_dir))
