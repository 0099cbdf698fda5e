"""Downstream evaluation through lm-eval-harness: `MixtralLM` (adapter.py) is our model as an
`lm_eval.api.model.LM`; `TaskSuite` (harness.py) resolves task names through lm-eval's
TaskManager and runs them with its evaluator. Imported lazily: lm-eval is loaded only when used."""

from __future__ import annotations

from typing import Any

_EXPORTS = {"MixtralLM": "adapter", "TaskSuite": "harness", "downstream_metrics": "harness"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
