"""Forward + backward time of one MoE layer per dispatch path, as a ratio to a dense SwiGLU layer
doing the same active FLOPs (hidden width top_k x expert width), measured in the same run.

    python -m benchmarks.moe_dispatch            # small grid, ~2-3 minutes on 2 CPU cores
    python -m benchmarks.moe_dispatch --full     # tokens 1k-16k x E {8,16,64} x k {1,2,8} x dim 256-1024

Each timing: jit, two warm-up calls, median of --reps calls with block_until_ready. The MoE layer
is MoEBlock as trained (router, top-k softmax, dispatch, aux and z losses in the objective),
differentiated w.r.t. its input and all its parameters; the dense layer likewise. Expert hidden
width = --hidden-mult x dim. Configurations whose estimated cost exceeds --max-gflop are skipped
(the dense dispatcher does E / k times the active FLOPs). Runs under the heap settings
`mixtral-jax train` restarts itself with (host_allocator.py), as the layers run in training.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import ModelConfig, MoEConfig
from mixtral_jax.host_allocator import reexec_with_tunables
from mixtral_jax.models.layers import MLP
from mixtral_jax.models.moe import MoEBlock

PATHS = ("dense", "capacity", "dropless")
SMALL_GRID = [  # (tokens, experts, top_k, dim)
    (1024, 8, 2, 256),
    (4096, 8, 2, 256),
    (4096, 8, 2, 512),
    (16384, 8, 2, 256),
    (4096, 8, 1, 512),
    (4096, 16, 2, 256),
    (4096, 64, 8, 256),
]


def full_grid() -> list[tuple[int, int, int, int]]:
    return list(itertools.product((1024, 4096, 16384), (8, 16, 64), (1, 2, 8), (256, 512, 1024)))


def median_seconds(calls: dict[str, tuple[Callable, tuple]], reps: int) -> dict[str, float]:
    """Median wall time per call; the calls take turns in every round, so drift in the machine's
    speed (shared cores, thermal) hits all of them alike and cancels in the ratios."""
    for fn, args in calls.values():
        for _ in range(2):
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def train_step_fn(module: nnx.Module, is_moe: bool) -> tuple[Callable, object]:
    """jit(value_and_grad) of sum(y * cotangent) (+ router losses) w.r.t. the input and all
    parameters. The value keeps the forward output live: under plain grad XLA drops the dense
    layer's last matmul (a linear loss needs no y), which the MoE layer cannot (the routing-weight
    gradient reads the expert outputs), and the baseline would be ~11% too cheap."""
    graphdef, params = nnx.split(module)

    def loss(params, x, cotangent):
        out = nnx.merge(graphdef, params)(x)
        if not is_moe:
            return jnp.sum(out * cotangent)
        y, stats = out
        return jnp.sum(y * cotangent) + 0.01 * stats["aux_loss"] + 0.001 * stats["z_loss"]

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def moe_config(dim: int, hidden: int, experts: int, top_k: int, dispatch: str, args) -> ModelConfig:
    moe = MoEConfig(num_experts=experts, top_k=top_k, dispatch=dispatch, capacity_factor=args.capacity_factor)
    return ModelConfig(dim=dim, hidden_dim=hidden, n_layers=1, dtype=args.dtype, moe=moe)


def run_config(tokens: int, experts: int, top_k: int, dim: int, args) -> dict[str, float | None]:
    hidden = args.hidden_mult * dim
    keys = jax.random.split(jax.random.key(0), 2)
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(keys[0], (1, tokens, dim), dtype)
    cotangent = jax.random.normal(keys[1], (1, tokens, dim), dtype)
    active_gflop = 3 * 2 * 3 * tokens * dim * hidden * top_k / 1e9  # fwd + bwd = 3x, 3 matmuls

    dense_eq = MLP(dim, top_k * hidden, dtype=dtype, rngs=nnx.Rngs(0))
    # 2-D [N, D] as the MoE block uses internally: XLA:CPU runs this layer ~2x slower on [1, N, D]
    # (measured), which would flatter every MoE ratio.
    step, params = train_step_fn(dense_eq, is_moe=False)
    calls = {"base": (step, (params, x[0], cotangent[0]))}
    for path in PATHS:
        cost = active_gflop * (experts / top_k if path == "dense" else 1.0)
        if cost <= args.max_gflop:
            block = MoEBlock(moe_config(dim, hidden, experts, top_k, path, args), rngs=nnx.Rngs(0))
            step, params = train_step_fn(block, is_moe=True)
            calls[path] = (step, (params, x, cotangent))
    seconds = median_seconds(calls, args.reps)
    base = seconds.pop("base")
    return {"dense_equiv_ms": 1e3 * base, **{p: seconds[p] / base if p in seconds else None for p in PATHS}}


def main() -> None:
    reexec_with_tunables()  # before any step runs: the new process has the settings from its start
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole grid (hours on a small CPU)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--hidden-mult", type=int, default=2, help="expert hidden width / dim")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--config", action="append", default=[], metavar="TOKENS,E,K,DIM",
                        help="measure these rows instead of a grid (repeatable)")
    parser.add_argument("--max-gflop", type=float, default=None,
                        help="skip a path whose fwd+bwd estimate exceeds this (default 120, --full 20000)")
    args = parser.parse_args()
    if args.max_gflop is None:
        args.max_gflop = 20000.0 if args.full else 120.0
    grid = full_grid() if args.full else SMALL_GRID
    if args.config:
        grid = [tuple(int(v) for v in row.split(",")) for row in args.config]

    device = jax.devices()[0]
    print(f"# MoE dispatch, fwd+bwd, ratio to a dense SwiGLU of width k x hidden "
          f"({device.platform}: {device.device_kind}, {jax.device_count()} device(s), jax {jax.__version__}; "
          f"{args.dtype}, hidden = {args.hidden_mult} x dim, capacity_factor {args.capacity_factor}, "
          f"median of {args.reps}; GLIBC_TUNABLES {os.environ.get('GLIBC_TUNABLES')})")
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
