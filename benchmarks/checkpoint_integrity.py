"""What checkpoint digests cost: save and restore of the whole train state (params, AdamW state,
router biases, step, RNG; data and clock JSON) with digests (written and checked) against
without, on the quickstart model and a ~94M-parameter MoE, one CPU device.

    python -m benchmarks.checkpoint_integrity           # ~8 minutes on 2 cores (3 repeats)
    python -m benchmarks.checkpoint_integrity --smoke   # the quickstart model, one round (test suite)

Measured per round, alternating the two Checkpointers (separate directories, same state):
- async save: the time `save()` blocks the train loop (the hashing runs in orbax's background
  commit thread once `save()` has returned, so this is the cost on the critical path). Target
  <= 1.05x.
- save until committed: save + wait, i.e. when the step is durable (reported, no target).
- restore: `restore()` into the state's shardings, arrays ready (with digests: hashed and
  compared). Target <= 1.2x.
Figures are medians over rounds; each repeat's ratio is the median of its per-round ratios, and
the printed ratio the median over repeats. Also printed: the main thread's CPU time while
`save()` blocks, which the shared machine's scheduling noise does not inflate.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `mixtral_jax` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import orbax.checkpoint as ocp

from benchmarks.train_step import paired, ratio_line
from mixtral_jax.config import load_config
from mixtral_jax.models.params import param_counts
from mixtral_jax.parallel.mesh import make_mesh
from mixtral_jax.training.checkpoint import Checkpointer
from mixtral_jax.training.program import build_program

MODELS = {
    "quickstart": [],
    "94M": ["model.dim=768", "model.n_layers=8", "model.n_heads=12", "model.n_kv_heads=4", "model.head_dim=64",
            "model.hidden_dim=1024", "model.moe.num_experts=4"],
}
TARGETS = {"async save": 1.05, "restore": 1.2}
KINDS = ("async save", "save until committed", "restore")


def measure(name: str, overrides: list[str], rounds: int, repeats: int, root: Path) -> list[dict[str, list[float]]]:
    """Each repeat's times by `<kind> <with|without>`, for one model's state built once."""
    cfg = load_config("quickstart", [*overrides, "mesh.data=1"])
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    program = build_program(cfg, mesh)
    state, target = program.init_state(), program.sharded_shapes()
    jax.block_until_ready(state)
    print(f"{name}: {param_counts(cfg.model)['total'] / 1e6:.1f}M parameters, state "
          f"{sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20:.0f} MiB", flush=True)
    return [measure_once(state, target, rounds, root / f"{name}_{i}") for i in range(repeats)]


def measure_once(state: dict, target: dict, rounds: int, root: Path) -> dict[str, list[float]]:
    data, meta = {"position": 12345, "epoch": 0}, {"clock_seconds": 1.5}
    ckpts = {v: Checkpointer(root / v, keep=2, verify=v == "with") for v in ("with", "without")}
    times: dict[str, list[float]] = {f"{k} {v}": [] for k in (*KINDS, "async save cpu") for v in ("with", "without")}
    for r in range(rounds + 1):  # round 0 warms up (first save creates directories, first restore compiles)
        for variant in (("with", "without") if r % 2 else ("without", "with")):
            ckpt = ckpts[variant]
            start, cpu_start = time.perf_counter(), time.thread_time()
            ckpt.save(r, state, data, meta)
            blocked, blocked_cpu = time.perf_counter() - start, time.thread_time() - cpu_start
            ckpt.wait()
            committed = time.perf_counter() - start
            start = time.perf_counter()
            restored = ckpt.restore(r, target)
            jax.block_until_ready(restored[0])
            restore_s = time.perf_counter() - start
            del restored
            if r:
                times[f"async save {variant}"].append(blocked)
                times[f"async save cpu {variant}"].append(blocked_cpu)
                times[f"save until committed {variant}"].append(committed)
                times[f"restore {variant}"].append(restore_s)
    for ckpt in ckpts.values():
        ckpt.close()
    return times


def report(name: str, repeats: list[dict[str, list[float]]]) -> None:
    """Per repeat: medians and the paired ratio of each kind; then one ratio line per kind, the
    median of the repeats' ratios (a single repeat on a shared machine can be off by 30%)."""
    ratios: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for i, times in enumerate(repeats, 1):
        for kind in KINDS:
            with_s, without_s = times[f"{kind} with"], times[f"{kind} without"]
            ratios[kind].append(paired(with_s, without_s))
            print(f"{name} repeat {i} {kind}: {statistics.median(with_s):.3f} s with digests, "
                  f"{statistics.median(without_s):.3f} s without, {ratios[kind][-1]:.3f}x")
        # The main thread's CPU seconds while save() blocks: the work digests add to the critical
        # path, free of the scheduling noise of a shared machine that the wall times carry.
        print(f"{name} repeat {i} async save, main-thread CPU: {statistics.median(times['async save cpu with']) * 1e3:.1f}"
              f" ms with digests, {statistics.median(times['async save cpu without']) * 1e3:.1f} ms without")
    for kind in KINDS:
        value, target = statistics.median(ratios[kind]), TARGETS.get(kind)
        text = (f"target <= {target}" if target else "no target") + (
            f"; median of {len(repeats)} repeats: {', '.join(f'{r:.3f}' for r in ratios[kind])}" if len(repeats) > 1 else "")
        print(ratio_line(f"{name} {kind} with/without digests", value, text, target is None or value <= target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="quickstart model, one round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds for the 94M model; the quickstart model, "
                                                                "whose saves take milliseconds, gets 4x as many")
    parser.add_argument("--repeats", type=int, default=3, help="whole measurements per model; the ratio lines are "
                                                               "the median of the repeats' ratios")
    args = parser.parse_args()
    models = {"quickstart": MODELS["quickstart"]} if args.smoke else MODELS
    rounds, repeats = (1, 1) if args.smoke else (args.rounds, args.repeats)
    print(f"jax {jax.__version__}, orbax-checkpoint {ocp.__version__}, devices: {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPU cores; {rounds} rounds, {repeats} repeats", flush=True)
    root = Path(tempfile.mkdtemp(prefix="ckpt_integrity_"))
    try:
        for name, overrides in models.items():
            model_rounds = rounds * (4 if name == "quickstart" and not args.smoke else 1)
            report(name, measure(name, overrides, model_rounds, repeats, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
