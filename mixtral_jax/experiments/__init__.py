"""The studies behind `mixtral-jax experiment NAME`: each module has `run(out, smoke, overrides)`
that trains (or reuses) its runs under `out` and writes `out/report.md` with PNG plots."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

EXPERIMENTS = {
    "dense_vs_moe": "dense vs a fine-grained MoE of equal active compute (3 paired seeds), a dense model of the "
                    "MoE's total size, and the MoE upcycled from the dense run; --ladder: 3 sizes",
    "router_ablation": "aux / z-loss coefficients, routers, loss-free balancing, capacity vs dropless",
    "routing_analysis": "Mixtral paper section 5 on the embedded corpus: experts by token kind, consecutive tokens",
}


def run_experiment(name: str, out: Path, smoke: bool = False, overrides: Sequence[str] = (), **options) -> Path:
    module = importlib.import_module(f"mixtral_jax.experiments.{name}")
    return module.run(out, smoke=smoke, overrides=list(overrides), **options)
