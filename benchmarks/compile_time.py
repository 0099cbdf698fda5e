"""First-step compile time against depth: lower + compile of the real train step (`build_program`,
as the Trainer compiles it, on a one-device mesh) for configs/model/tiny_dense.yaml and
tiny_moe.yaml at 4 and 32 layers. Layers are stacked and applied with nnx.scan, so the program
(and its compile time) should not grow with depth. Target: 32 layers / 4 layers <= 1.5x.

    python -m benchmarks.compile_time            # ~2 minutes on 2 cores
    python -m benchmarks.compile_time --smoke    # one round (the test suite)
    python -m benchmarks.compile_time --unrolled # the loop against fully unrolled layers, 4-32 layers

--unrolled measures what `model.scan_unroll: auto` trades: unrolled layers compile in time that
grows with depth, the loop in time flat in depth (kernels/backend.py draws the line from it).

Each measurement builds the program afresh (new jitted functions: nothing is reused from an
earlier compile; no persistent compilation cache is configured) and lowers it against the
abstract state, so no weights are allocated. One untimed compile first (the process's first
pays one-time set-up); then rounds alternate the four configs; figures are medians over rounds,
and each ratio is the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `mixtral_jax` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np

from benchmarks.train_step import paired, ratio_line, threads
from mixtral_jax.config import CONFIG_DIR, Config, MeshConfig, load_config, validate
from mixtral_jax.parallel.mesh import batch_sharding, make_mesh
from mixtral_jax.training.program import build_program

TARGET = 1.5
DEPTHS = (4, 32)


def tiny(kind: str, layers: int, seq: int, batch: int, unroll: int = 1) -> Config:
    """configs/model/tiny_<kind>.yaml at `layers` layers, `unroll` layers per scan step, on one device."""
    cfg = load_config(CONFIG_DIR / "model" / f"tiny_{kind}.yaml",
                      [f"model.n_layers={layers}", f"data.seq_len={seq}", f"data.batch_size={batch}",
                       f"model.scan_unroll={unroll}"])
    cfg.mesh = MeshConfig(data=1)
    validate(cfg)
    return cfg


def compile_seconds(cfg: Config) -> tuple[float, float]:
    """(lower s, compile s) of a freshly built train step."""
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    program = build_program(cfg, mesh)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    sharding = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((b, t), dt, sharding=sharding)
             for k, dt in (("inputs", np.int32), ("targets", np.int32), ("segment_ids", np.int32),
                           ("positions", np.int32), ("loss_mask", np.float32))}
    start = time.perf_counter()
    lowered = program.train_step.lower(program.sharded_shapes(), batch)
    mid = time.perf_counter()
    lowered.compile()
    return mid - start, time.perf_counter() - mid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one round, dense only")
    parser.add_argument("--rounds", type=int, default=None, help="default 3, smoke 1")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--unrolled", action="store_true", help="loop vs fully unrolled layers at 4, 8, 16, 32 layers")
    args = parser.parse_args()
    if args.unrolled:
        return unrolled(args.seq, args.batch)
    rounds = args.rounds or (1 if args.smoke else 3)
    print(f"# train-step compile time on {jax.devices()[0].device_kind} (1 of {jax.device_count()} device(s)), "
          f"{threads()} threads, jax {jax.__version__}; tiny_dense / tiny_moe at {DEPTHS[0]} and {DEPTHS[1]} layers, "
          f"seq {args.seq}, batch {args.batch}; {rounds} round(s)", flush=True)
    kinds = ("dense",) if args.smoke else ("dense", "moe")  # smoke: the suite only checks it runs
    cfgs = {(kind, layers): tiny(kind, layers, args.seq, args.batch) for kind in kinds for layers in DEPTHS}
    lower: dict[tuple[str, int], list[float]] = {key: [] for key in cfgs}
    total: dict[tuple[str, int], list[float]] = {key: [] for key in cfgs}
    keys = list(cfgs)
    compile_seconds(cfgs[keys[0]])  # untimed: the process's first compile also pays one-time set-up
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            lo, co = compile_seconds(cfgs[key])
            lower[key].append(lo)
            total[key].append(lo + co)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {l} layers {total[(k, l)][-1]:.1f} s" for k, l in keys),
              flush=True)

    print("\n| model | layers | lower s | lower + compile s |")
    print("|---|---:|---:|---:|")
    for kind, layers in keys:
        print(f"| tiny_{kind} | {layers} | {statistics.median(lower[(kind, layers)]):.2f} | "
              f"{statistics.median(total[(kind, layers)]):.2f} |")
    print("")
    deep, shallow = DEPTHS[1], DEPTHS[0]
    for kind in kinds:
        value = paired(total[(kind, deep)], total[(kind, shallow)])
        print(ratio_line(f"{kind} compile {deep} layers / {shallow} layers", value, f"target <= {TARGET:g}x",
                         value <= TARGET))


def unrolled(seq: int, batch: int) -> None:
    """Compile seconds of the loop and of fully unrolled layers, one round, by depth."""
    print(f"# train-step compile time, loop vs unrolled layers, on {jax.devices()[0].device_kind}, {threads()} "
          f"threads, jax {jax.__version__}; seq {seq}, batch {batch}", flush=True)
    compile_seconds(tiny("dense", 4, seq, batch))  # untimed: one-time set-up
    print("| model | layers | loop s | unrolled s | unrolled / loop |\n|---|---:|---:|---:|---:|")
    for kind in ("dense", "moe"):
        for layers in (4, 8, 16, 32):
            loop, full = (sum(compile_seconds(tiny(kind, layers, seq, batch, unroll))) for unroll in (1, layers))
            print(f"| tiny_{kind} | {layers} | {loop:.1f} | {full:.1f} | {full / loop:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
