"""Forward + backward time of one MoE layer per dispatch path, as a ratio to a dense SwiGLU layer
doing the same active FLOPs (hidden width top_k x expert width), measured in the same run.

    python benchmarks/moe_dispatch.py            # small grid, a few minutes on 2 CPU cores
    python benchmarks/moe_dispatch.py --full     # tokens 1k-16k x E {8,16,64} x k {1,2,8} x dim 256-1024

Each timing: jit, two warm-up calls, median of --reps calls with block_until_ready. The MoE layer
is MoEBlock as trained (router, top-k softmax, dispatch, aux and z losses in the objective),
differentiated w.r.t. its input and all its parameters; the dense layer likewise. Expert hidden
width = --hidden-mult x dim. Configurations whose estimated cost exceeds --max-gflop are skipped
(the dense dispatcher does E / k times the active FLOPs).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import ModelConfig, MoEConfig
from mixtral_jax.models.layers import MLP
from mixtral_jax.models.moe import MoEBlock

PATHS = ("dense", "capacity", "dropless")
SMALL_GRID = [  # (tokens, experts, top_k, dim)
    (1024, 8, 2, 256),
    (4096, 8, 2, 256),
    (4096, 8, 2, 512),
    (4096, 8, 1, 512),
    (4096, 16, 2, 256),
    (4096, 64, 8, 256),
]


def full_grid() -> list[tuple[int, int, int, int]]:
    return list(itertools.product((1024, 4096, 16384), (8, 16, 64), (1, 2, 8), (256, 512, 1024)))


def median_seconds(fn: Callable, *args, reps: int) -> float:
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_fn(module: nnx.Module, is_moe: bool) -> tuple[Callable, object]:
    """jit(grad) of sum(y * cotangent) (+ router losses) w.r.t. the input and all parameters."""
    graphdef, params = nnx.split(module)

    def loss(params, x, cotangent):
        out = nnx.merge(graphdef, params)(x)
        if not is_moe:
            return jnp.sum(out * cotangent)
        y, stats = out
        return jnp.sum(y * cotangent) + 0.01 * stats["aux_loss"] + 0.001 * stats["z_loss"]

    return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def moe_config(dim: int, hidden: int, experts: int, top_k: int, dispatch: str, factor: float) -> ModelConfig:
    moe = MoEConfig(num_experts=experts, top_k=top_k, dispatch=dispatch, capacity_factor=factor)
    return ModelConfig(dim=dim, hidden_dim=hidden, n_layers=1, moe=moe)


def run_config(tokens: int, experts: int, top_k: int, dim: int, args) -> dict[str, float | None]:
    hidden = args.hidden_mult * dim
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (1, tokens, dim), jnp.float32)
    cotangent = jax.random.normal(keys[1], (1, tokens, dim), jnp.float32)
    active_gflop = 3 * 2 * 3 * tokens * dim * hidden * top_k / 1e9  # fwd + bwd = 3x, 3 matmuls

    dense_eq = MLP(dim, top_k * hidden, rngs=nnx.Rngs(0))
    step, params = train_step_fn(dense_eq, is_moe=False)
    base = median_seconds(step, params, x, cotangent, reps=args.reps)
    row: dict[str, float | None] = {"dense_equiv_ms": 1e3 * base}
    for path in PATHS:
        cost = active_gflop * (experts / top_k if path == "dense" else 1.0)
        if cost > args.max_gflop:
            row[path] = None
            continue
        block = MoEBlock(moe_config(dim, hidden, experts, top_k, path, args.capacity_factor), rngs=nnx.Rngs(0))
        step, params = train_step_fn(block, is_moe=True)
        row[path] = median_seconds(step, params, x, cotangent, reps=args.reps) / base
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole grid (hours on a small CPU)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hidden-mult", type=int, default=2, help="expert hidden width / dim")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--max-gflop", type=float, default=None,
                        help="skip a path whose fwd+bwd estimate exceeds this (default 120, --full 20000)")
    args = parser.parse_args()
    if args.max_gflop is None:
        args.max_gflop = 20000.0 if args.full else 120.0
    grid = full_grid() if args.full else SMALL_GRID

    device = jax.devices()[0]
    print(f"# MoE dispatch, fwd+bwd, ratio to a dense SwiGLU of width k x hidden "
          f"({device.platform}: {device.device_kind}, {jax.device_count()} device(s), jax {jax.__version__}; "
          f"hidden = {args.hidden_mult} x dim, capacity_factor {args.capacity_factor}, median of {args.reps})")
    print("| tokens | E | k | dim | dense-equiv ms | " + " | ".join(PATHS) + " |")
    print("|---:|---:|---:|---:|---:|" + "---:|" * len(PATHS))
    for tokens, experts, top_k, dim in grid:
        if top_k > experts:
            continue
        row = run_config(tokens, experts, top_k, dim, args)
        cells = ["skip" if row[p] is None else f"{row[p]:.2f}x" for p in PATHS]
        print(f"| {tokens} | {experts} | {top_k} | {dim} | {row['dense_equiv_ms']:.1f} | " + " | ".join(cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
