"""Task names resolved through lm-eval's TaskManager, and tasks run by lm-eval's evaluator.

`TaskSuite.resolve` finds every name (a task, group or tag; a glob such as `mmlu_*`; or a task
YAML file) once; `TaskSuite.evaluate` runs them on an `lm_eval.api.model.LM` with the settings
lm-eval's `simple_evaluate` applies (few-shot count and seed per task, the random seeds) and
returns the library's results object. `simple_evaluate` itself is not called because it also
collects the machine's environment report (seconds of subprocesses on every call, which a
training run evaluating every few hundred steps should not pay).
"""

from __future__ import annotations

import difflib
import fnmatch
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mixtral_jax.config import ConfigError
from mixtral_jax.downstream import tasks as shipped
from mixtral_jax.downstream.offline import stay_offline

RANDOM_SEED, NUMPY_SEED, TORCH_SEED, FEWSHOT_SEED = 0, 1234, 1234, 1234  # simple_evaluate's defaults
DEFAULT_BOOTSTRAP_ITERS = 100000  # lm-eval's default (stderr of metrics without a closed form)


def _include_paths(include_path: str | Path | Sequence[str | Path] | None) -> list[str]:
    if include_path is None:
        return []
    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    for path in paths:
        if not Path(path).exists():
            raise ConfigError(f"--include-path {path}: no such file or directory")
    return [str(p) for p in paths]


def _expand(names: Sequence[str], manager: Any) -> tuple[list[str], list[str]]:
    """(the names lm-eval knows, globs expanded; the names it does not)."""
    known, unknown = [], []
    for name in names:
        if any(c in name for c in "*?["):
            matches = manager.match_tasks([name])
            (known.extend(matches) if matches else unknown.append(name))
        elif name in manager.all_tasks or (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            known.append(name)
        else:
            unknown.append(name)
    return known, unknown


@dataclass
class TaskSuite:
    """Task names resolved once against lm-eval's index (built-in tasks and `include_path`)."""

    manager: Any  # lm_eval.tasks.TaskManager
    names: list[str]

    @classmethod
    def resolve(cls, names: Sequence[str], include_path: str | Path | Sequence[str | Path] | None = None,
                online: bool = False) -> "TaskSuite":
        """Every name must be a task, group or tag (or match one as a glob, or be a task YAML);
        an unknown one is one ConfigError naming the closest known names. The shipped task
        (`python_next_line`, tasks.py) is found without include_path. When the include paths
        define every name, lm-eval's own task folders (14k entries) are not indexed."""
        names = [n.strip() for n in names if n.strip()]
        if not names:
            raise ConfigError("no task given (--tasks NAME[,NAME...])")
        stay_offline(online)
        from lm_eval.tasks import TaskManager

        paths = _include_paths(include_path)
        if any(fnmatch.fnmatchcase(shipped.TASK, name) for name in names):
            paths.append(str(shipped.shipped_task_dir()))  # built on first use, offline
        if paths:
            local = TaskManager(include_path=paths, include_defaults=False)
            known, unknown = _expand(names, local)
            if not unknown:
                return cls(local, known)
        manager = TaskManager(include_path=paths or None)
        known, unknown = _expand(names, manager)
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            where = "lm-eval's tasks" + (" and --include-path" if paths else "")
            hint = f"; close names: {', '.join(close)}" if close else " (`lm-eval ls tasks` lists them)"
            raise ConfigError(f"unknown task '{name}' (not among {where}){hint}")
        return cls(manager, known)

    def evaluate(self, lm: Any, *, num_fewshot: int | None = None, limit: int | float | None = None,
                 bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS, log_samples: bool = False) -> dict:
        """lm-eval's results object for these tasks on `lm` (`results[task]["acc,none"]` and so
        on), with a `config` entry recording the settings."""
        from importlib.metadata import version

        from lm_eval.evaluator import evaluate

        random.seed(RANDOM_SEED)
        np.random.seed(NUMPY_SEED)
        try:
            import torch

            torch.manual_seed(TORCH_SEED)
        except ImportError:  # lm-eval seeds torch only where it is installed, too
            pass
        loaded = self.manager.load(self.names)
        for task in loaded["tasks"].values():
            # As simple_evaluate: --num-fewshot overrides a task's default unless the task fixes 0.
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        start = time.time()
        results = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters,
                           log_samples=log_samples)
        results["config"] = {
            "model": type(lm).__name__, **(lm.get_model_info() if hasattr(lm, "get_model_info") else {}),
            "batch_size": getattr(lm, "batch_size", None), "limit": limit, "num_fewshot": num_fewshot,
            "bootstrap_iters": bootstrap_iters, "random_seed": RANDOM_SEED, "numpy_seed": NUMPY_SEED,
            "torch_seed": TORCH_SEED, "fewshot_seed": FEWSHOT_SEED, "lm_eval_version": version("lm_eval"),
            "eval_seconds": time.time() - start,
        }
        results["date"] = start
        return results


def downstream_metrics(results: dict) -> dict[str, float]:
    """`downstream/<task>/<metric>` -> value for every numeric metric of lm-eval's results
    (`acc,none` is `acc`; another filter stays in the name, `exact_match,strict-match`; the
    document count `sample_len` and stderr that was not computed ("N/A") are left out)."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = key[:-len(",none")] if key.endswith(",none") else key
            out[f"downstream/{task}/{name}"] = float(value)
    return out
