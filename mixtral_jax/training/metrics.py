"""Where metrics go: `metrics.jsonl` (the record), wandb (offline by default), a progress bar.

Metric names are a contract (DESIGN.md): the same keys go to every sink.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm


def to_python(value: Any) -> Any:
    """Arrays and numpy scalars -> plain JSON values (lists for per-layer x expert tables)."""
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    arr = np.asarray(value)
    if arr.ndim == 0:
        item = arr.item()
        return item if not isinstance(item, float) or math.isfinite(item) else str(item)
    return arr.tolist()


class MetricsLogger:
    """Appends one JSON object per logged step; mirrors scalars to wandb and the progress bar."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, wandb_mode: str,
                 wandb_project: str, run_name: str, config: dict, progress: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self._wandb = None
        if wandb_mode != "off":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=run_name, dir=str(run_dir), mode=wandb_mode,
                                     config=config, resume="allow", id=_wandb_id(run_dir, run_name))
        self._bar = tqdm(total=total_steps, initial=start_step, desc=run_name, dynamic_ncols=True,
                         disable=not progress, unit="step")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, list)}, step=step)
        shown = {k: record[k] for k in ("loss", "eval_loss", "tokens_per_s") if k in record}
        if shown:
            self._bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in shown.items()})

    def advance(self, steps: int = 1) -> None:
        self._bar.update(steps)

    def write(self, message: str) -> None:
        self._bar.write(message)

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            for key, value in values.items():
                self._wandb.summary[key] = to_python(value)

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_id(run_dir: Path, run_name: str) -> str:
    """A stable id per run dir so a resumed run continues the same wandb run."""
    id_file = Path(run_dir) / "wandb_id"
    if id_file.exists():
        return id_file.read_text().strip()
    import uuid

    run_id = f"{run_name}-{uuid.uuid4().hex[:8]}"
    id_file.write_text(run_id)
    return run_id


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
