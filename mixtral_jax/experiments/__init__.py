"""The studies behind `mixtral-jax experiment NAME`: each module has `run(out, smoke, overrides)`
that trains (or reuses) its runs under `out` and writes `out/report.md` with PNG plots."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Sequence

EXPERIMENTS = {
    "dense_vs_moe": "dense vs its 8-expert top-2 version vs an active-matched wide dense (7B vs 8x7B, scaled down)",
    "router_ablation": "aux / z-loss coefficients, routers, loss-free balancing, capacity vs dropless",
    "routing_analysis": "Mixtral paper section 5 on the embedded corpus: experts by token kind, consecutive tokens",
}


def run_experiment(name: str, out: Path, smoke: bool = False, overrides: Sequence[str] = (), **options) -> Path:
    module = importlib.import_module(f"mixtral_jax.experiments.{name}")
    return module.run(out, smoke=smoke, overrides=list(overrides), **options)
