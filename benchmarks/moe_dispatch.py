"""Forward + backward time of one MoE layer per dispatch path, as a ratio to a dense SwiGLU layer
doing the same active FLOPs, measured in the same run.

    python -m benchmarks.moe_dispatch            # default grid, ~5-6 minutes on 2 CPU cores
    python -m benchmarks.moe_dispatch --smoke    # tiny shapes of every row kind (the test suite)
    python -m benchmarks.moe_dispatch --full     # tokens 1k-16k x E {8,16,64} x k {1,2,8} x dim 256-1024
    python -m benchmarks.moe_dispatch --config 4096,64,8,256,width=128 --breakdown  # where dropless's time goes

A row is TOKENS,E,K,DIM[,width=W][,shared=S][,gate]: E routed experts of width W (default
--hidden-mult x DIM; W < that is a fine-grained design), top-K, plus S shared experts of width W
that every token passes through (`model.moe.shared_experts`), their output gated per token with
`gate` (`model.moe.shared_gate`). The dense-equivalent layer is one SwiGLU of width K x W + S x W:
the same active FLOPs as the MoE layer's experts, routed and shared (the router and the shared
gate, [DIM, E] and [DIM, 1] matmuls, are left out of the equivalence).

Each timing: jit, one warm-up call, then --reps rounds in which every contender runs once, the
order reversing every round; a ratio is the median over rounds of the ratio within a round, so a
shared machine's drifting speed cancels. --clock cpu times this process's CPU time instead: at a
load average of 15-20 on 2 cores, wall-clock ratios of the same code moved by up to 0.5x between
runs, CPU-time ratios far less. The MoE layer is MoEBlock as trained (router, top-k softmax,
dispatch, aux and z losses in the objective), differentiated w.r.t. its input and all its
parameters; the dense layer likewise. Paths whose estimated cost exceeds --max-gflop are
skipped (the dense dispatcher does E / K times the routed FLOPs). Every row prints a `ratio` line
for dropless against its target (1.3x; 1.5x for fine-grained rows). Runs under the heap settings
`mixtral-jax train` restarts itself with (host_allocator.py), as the layers run in training.

--breakdown: for each row, a per-XLA-op breakdown of one traced dropless step and of its
dense-equivalent (jax.profiler, XLA:CPU's per-thunk events; ops may overlap on several cores).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a file: make `mixtral_jax` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mixtral_jax.host_allocator import reexec_with_tunables  # noqa: E402

reexec_with_tunables()  # before any step runs: the new process has the settings from its start

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.train_step import interleave, paired, profile_ops, ratio_line  # noqa: E402
from mixtral_jax.config import ModelConfig, MoEConfig  # noqa: E402
from mixtral_jax.models.layers import MLP  # noqa: E402
from mixtral_jax.models.moe import MoEBlock  # noqa: E402

PATHS = ("dense", "capacity", "dropless")
TARGET = 1.3  # dropless / dense-equivalent (docs/performance.md, targets)
FINE_GRAINED_TARGET = 1.5  # many narrow experts: more, smaller matmuls per routed FLOP


@dataclass(frozen=True)
class Row:
    tokens: int
    experts: int
    top_k: int
    dim: int
    width: int | None = None  # routed expert width; None: --hidden-mult x dim
    shared: int = 0  # shared experts, each `width` wide
    gate: bool = False  # the shared output gated per token

    @classmethod
    def parse(cls, text: str) -> "Row":
        """TOKENS,E,K,DIM[,width=W][,shared=S][,gate]"""
        parts = text.split(",")
        try:
            extra: dict[str, Any] = {}
            for part in parts[4:]:
                key, _, value = part.partition("=")
                if key == "gate" and not value:
                    extra["gate"] = True
                elif key in ("width", "shared") and value:
                    extra[key] = int(value)
                else:
                    raise ValueError(part)
            return cls(*(int(v) for v in parts[:4]), **extra)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(f"{text!r}: expected TOKENS,E,K,DIM[,width=W][,shared=S][,gate] "
                                             f"({err})") from None

    def expert_width(self, hidden_mult: int) -> int:
        return self.width or hidden_mult * self.dim

    def fine_grained(self, hidden_mult: int) -> bool:
        return self.expert_width(hidden_mult) < hidden_mult * self.dim

    def label(self, hidden_mult: int) -> str:
        text = f"{self.tokens} tokens E{self.experts} k{self.top_k} dim {self.dim} width {self.expert_width(hidden_mult)}"
        if self.shared:
            text += f" + {self.shared} shared" + (" gated" if self.gate else "")
        return text


SMALL_GRID = [
    Row(1024, 8, 2, 256),
    Row(4096, 8, 2, 256),
    Row(4096, 8, 2, 512),
    Row(16384, 8, 2, 256),
    Row(4096, 8, 1, 512),
    Row(4096, 16, 2, 256),
    Row(4096, 64, 8, 256),
    # fine-grained: 64 experts of width dim / 2, top-8 = a dense layer 4 x dim wide
    Row(4096, 64, 8, 256, width=128),
    Row(4096, 64, 8, 512, width=256),
    # Qwen2-MoE-like: 8 experts top-2 and one shared expert of the same width, plain and gated
    Row(4096, 8, 2, 256, shared=1),
    Row(4096, 8, 2, 256, shared=1, gate=True),
]
SMOKE_GRID = [
    Row(256, 8, 2, 64),
    Row(256, 64, 8, 64, width=32),
    Row(256, 8, 2, 64, shared=1, gate=True),
]


def full_grid() -> list[Row]:
    return [Row(*r) for r in itertools.product((1024, 4096, 16384), (8, 16, 64), (1, 2, 8), (256, 512, 1024))]


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


def moe_config(row: Row, dispatch: str, args) -> ModelConfig:
    moe = MoEConfig(num_experts=row.experts, top_k=row.top_k, dispatch=dispatch, capacity_factor=args.capacity_factor,
                    expert_hidden_dim=row.expert_width(args.hidden_mult), shared_experts=row.shared,
                    shared_gate=row.gate)
    return ModelConfig(dim=row.dim, hidden_dim=args.hidden_mult * row.dim, n_layers=1, dtype=args.dtype, moe=moe)


def dense_width(row: Row, hidden_mult: int) -> int:
    """Width of the dense SwiGLU doing the MoE layer's active expert FLOPs: k routed + S shared."""
    return (row.top_k + row.shared) * row.expert_width(hidden_mult)


def contenders(row: Row, args, paths=PATHS) -> dict[str, tuple[Callable, tuple]]:
    """name -> (jitted step, its arguments): `base` (the dense-equivalent layer) and each path
    within --max-gflop."""
    keys = jax.random.split(jax.random.key(0), 2)
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(keys[0], (1, row.tokens, row.dim), dtype)
    cotangent = jax.random.normal(keys[1], (1, row.tokens, row.dim), dtype)
    width = row.expert_width(args.hidden_mult)
    gflop = lambda w: 3 * 2 * 3 * row.tokens * row.dim * w / 1e9  # fwd + bwd = 3x, 3 matmuls
    dense_eq = MLP(row.dim, dense_width(row, args.hidden_mult), dtype=dtype, rngs=nnx.Rngs(0))
    # 2-D [N, D] as the MoE block uses internally: XLA:CPU runs this layer ~2x slower on [1, N, D]
    # (measured), which would flatter every MoE ratio.
    step, params = train_step_fn(dense_eq, is_moe=False)
    calls = {"base": (step, (params, x[0], cotangent[0]))}
    for path in paths:
        routed = row.top_k * width * (row.experts / row.top_k if path == "dense" else 1.0)
        if gflop(routed + row.shared * width) <= args.max_gflop:
            block = MoEBlock(moe_config(row, path, args), rngs=nnx.Rngs(0))
            step, params = train_step_fn(block, is_moe=True)
            calls[path] = (step, (params, x, cotangent))
    return calls


def timed(fn: Callable, args: tuple, clock: Callable[[], float]) -> Callable[[], float]:
    """A contender for `interleave` that returns its own duration on `clock`."""
    def call() -> float:
        start = clock()
        jax.block_until_ready(fn(*args))
        return float(clock() - start)
    return call


def run_row(row: Row, args) -> dict[str, float | None]:
    calls = contenders(row, args)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    samples = interleave({name: timed(fn, a, clock) for name, (fn, a) in calls.items()}, rounds=args.reps, pause=0.0)
    base = samples.pop("base")
    return {"dense_equiv_ms": 1e3 * statistics.median(base),
            **{p: paired(samples[p], base) if p in samples else None for p in PATHS}}


def trace_ops(fn: Callable, args: tuple, top: int, steps: int = 3) -> dict[str, Any]:
    """Per-op time of fn(*args) (train_step.py's profile_ops): time by category and the top ops."""
    compiled = fn.lower(*args).compile(compiler_options={"xla_cpu_enable_xprof_traceme": True})
    return profile_ops(lambda: jax.block_until_ready(compiled(*args)), compiled.as_text(), steps=steps, top=top,
                       shape_chars=48, source_chars=80)


def breakdown(row: Row, args) -> None:
    for name, (fn, fn_args) in contenders(row, args, paths=("dropless",)).items():
        found = trace_ops(fn, fn_args, top=args.top)
        total = sum(found["categories_ms"].values())
        title = "dense-equivalent" if name == "base" else name
        print(f"breakdown {row.label(args.hidden_mult)}, {title}: one traced step {found['step_ms']:.1f} ms wall, "
              f"ops sum {total:.1f} ms")
        for cat, t in sorted(found["categories_ms"].items(), key=lambda kv: -kv[1]):
            print(f"  {cat:<40} {t:8.1f} ms  {100 * t / max(total, 1e-9):5.1f}%")
        for op in found["top_ops"]:
            print(f"    {op['ms']:7.2f} ms  {op['op']:<28} {op['shape']:<48} {op['source']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole grid (hours on a small CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes of every row kind, 2 rounds")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 7, --smoke 2)")
    parser.add_argument("--hidden-mult", type=int, default=2, help="default expert width / dim")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--config", action="append", default=[], type=Row.parse,
                        metavar="TOKENS,E,K,DIM[,width=W][,shared=S][,gate]",
                        help="measure these rows instead of a grid (repeatable)")
    parser.add_argument("--max-gflop", type=float, default=None,
                        help="skip a path whose fwd+bwd estimate exceeds this (default 120, --full 20000)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time over all its threads, which other "
                             "processes on a shared machine disturb less, but which does not see how well a "
                             "layer uses the cores")
    parser.add_argument("--breakdown", action="store_true", help="only the per-op breakdown of dropless per row")
    parser.add_argument("--top", type=int, default=12, help="ops listed per breakdown")
    args = parser.parse_args()
    if args.max_gflop is None:
        args.max_gflop = 20000.0 if args.full else 120.0
    if args.reps is None:
        args.reps = 2 if args.smoke else 7
    grid = args.config or (SMOKE_GRID if args.smoke else full_grid() if args.full else SMALL_GRID)
    grid = [row for row in grid if row.top_k <= row.experts]
    if args.breakdown:
        for row in grid:
            breakdown(row, args)
        return

    device = jax.devices()[0]
    print(f"# MoE dispatch, fwd+bwd, ratio to a dense SwiGLU of width (k + shared) x expert width "
          f"({device.platform}: {device.device_kind}, {jax.device_count()} device(s), jax {jax.__version__}; "
          f"{args.dtype}, default expert width = {args.hidden_mult} x dim, capacity_factor {args.capacity_factor}, "
          f"{args.clock} clock, median of {args.reps} paired rounds; GLIBC_TUNABLES {os.environ.get('GLIBC_TUNABLES')})")
    print(f"| tokens | E | k | dim | expert width | shared | dense-equiv width | dense-equiv ms ({args.clock}) | "
          + " | ".join(PATHS) + " |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(PATHS))
    verdicts = []
    for row in grid:
        result = run_row(row, args)
        cells = ["skip" if result[p] is None else f"{result[p]:.2f}x" for p in PATHS]
        shared = f"{row.shared}{' gated' if row.gate else ''}" if row.shared else "-"
        print(f"| {row.tokens} | {row.experts} | {row.top_k} | {row.dim} | {row.expert_width(args.hidden_mult)} | "
              f"{shared} | {dense_width(row, args.hidden_mult)} | {result['dense_equiv_ms']:.1f} | "
              + " | ".join(cells) + " |", flush=True)
        target = FINE_GRAINED_TARGET if row.fine_grained(args.hidden_mult) else TARGET
        verdicts.append((row, result["dropless"], target))
    for row, value, target in verdicts:
        if value is not None:
            print(ratio_line(f"dropless / dense-equivalent, {row.label(args.hidden_mult)}", value,
                             f"target <= {target:g}x", value <= target))


if __name__ == "__main__":
    main()
