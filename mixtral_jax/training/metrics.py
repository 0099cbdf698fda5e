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
    """Appends one JSON object per logged step; mirrors scalars to wandb and the progress bar.
    In a multi-process job only the primary process records (primary=False: nothing is written,
    no wandb run, no bar): every process computes the same global metrics, and the processes
    share the run dir, so each record would otherwise appear once per process."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, wandb_mode: str,
                 wandb_project: str, run_name: str, config: dict, progress: bool, primary: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a") if primary else None
        self._wandb = None
        if wandb_mode != "off" and primary:
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            # No code, git, command-line or environment metadata: a secret typed as an argument
            # must not reach wandb's files (the resolved config is logged on purpose).
            quiet = wandb.Settings(disable_code=True, disable_git=True, x_disable_meta=True, x_save_requirements=False)
            self._wandb = wandb.init(project=wandb_project, name=run_name, dir=str(run_dir), mode=wandb_mode,
                                     config=config, resume="allow", id=_wandb_id(run_dir, run_name), settings=quiet)
        self._bar = tqdm(total=total_steps, initial=start_step, desc=run_name, dynamic_ncols=True,
                         disable=not (progress and primary), unit="step")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        if self._file is None:
            return
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
        if self._file is not None:
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


def _parse(lines: list[str]) -> list[dict]:
    """Records of metrics.jsonl; a line a killed process left half-written is skipped."""
    records = []
    for line in lines:
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return _parse(path.read_text().splitlines())


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records an interrupted run logged after its last checkpoint (they are redone): all
    of them if it died before its first checkpoint (step 0)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if any(r.get("step", 0) <= step for r in _parse([line]))]
        # Write aside and rename: a kill mid-write must not lose the records being kept.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def last_train_record(run_dir: Path) -> dict:
    train_records = [r for r in read_metrics(run_dir) if "loss" in r]
    return train_records[-1] if train_records else {}


def window_record(window: list[dict], skipped_key: str, internal: tuple[str, ...] = ()) -> dict[str, Any]:
    """One logged record from the host copies of the steps since the last log: means over the
    steps whose update was applied (a skipped step's NaN loss would hide the others), the
    number of skipped steps under `skipped_key`, `internal` keys left out."""
    skipped = [int(np.asarray(m.get(skipped_key, 0))) for m in window]
    applied = [m for m, s in zip(window, skipped) if not s] or window
    keys = [k for k in window[-1] if k not in internal and k != skipped_key]
    record = {k: np.mean(np.stack([np.asarray(m[k]) for m in applied]), axis=0) for k in keys}
    record[skipped_key] = sum(skipped)
    return record
