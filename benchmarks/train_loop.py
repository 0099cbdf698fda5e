"""CPU throughput as `mixtral-jax train` delivers it: tokens/s through the real train loop
(`Trainer.fit`: the grain pipeline over the embedded corpus, logging and the progress bar, the
cost clock, the non-finite guard, checkpoints at the quickstart's cadence) against HF
transformers' eager step (`TorchStep` of train_step.py: same model, batch and AdamW), over a
grid of shapes, dense and 8-expert top-2 MoE, interleaved round by round in one run.

    python -m benchmarks.train_loop              # the default grid, 2 rounds (~25 minutes on 2 cores)
    python -m benchmarks.train_loop --full       # every grid point: dim x vocab x seq x model
    python -m benchmarks.train_loop --overhead   # the loop against its bare compiled step, quickstart shape
    python -m benchmarks.train_loop --breakdown --only moe --shapes 1  # where a shape's step time goes
    python -m benchmarks.train_loop --smoke      # one tiny shape, one round (the test suite)

Ours: each round trains a fresh run (compile excluded: the loop's clock starts after it) for
`--steps` steps, logging every 10, and takes the median of its logged windows' tokens/s after the
first window (warm-up). Torch: the same number of steps after two warm-up steps, median step
time. A shape's ratio is the median over rounds of ours / torch within the round. The models use
the config defaults (`model.scan_unroll: auto`, `attention_impl: dot_product`, remat none).

A shape that misses the target in a run gets its step's per-op breakdown printed after the table
(`trace_breakdown` of train_step.py: time by category, and the costliest ops); --breakdown
prints only that, for the shapes chosen.

--overhead times the train loop against `OurStep` (build_program's compiled step on one fixed
batch, nothing else) at the quickstart's shape: what the loop itself costs per step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as a file: make `mixtral_jax` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mixtral_jax.host_allocator import reexec_with_tunables  # noqa: E402

reexec_with_tunables()  # the heap settings `mixtral-jax train` runs under
# One CPU device, as `mixtral-jax train` runs on a laptop: a device count forced through XLA_FLAGS
# (the test suite forces 8) would make the Trainer's mesh split the batch.
os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402

from benchmarks.train_step import OurStep, TorchStep, paired, ratio_line, threads, trace_breakdown  # noqa: E402
from mixtral_jax.config import Config, load_config  # noqa: E402
from mixtral_jax.training.metrics import read_metrics  # noqa: E402
from mixtral_jax.training.trainer import Trainer  # noqa: E402

TARGET = 1.0


class Shape(NamedTuple):
    dim: int
    ffn: int  # multiple of dim
    head_dim: int
    vocab: int
    seq: int
    batch: int

    @property
    def label(self) -> str:
        return f"dim {self.dim}, ffn {self.ffn}x, heads of {self.head_dim}, vocab {self.vocab}, seq {self.seq}, " \
               f"batch {self.batch}"


# Spread over the grid the users' studies run at: dim {128, 256, 512}, FFN 2-4x, heads of 32-64,
# vocab {4096, 8192, 32000}, seq {128, 256, 512}; batch chosen so a step takes 0.1-2 s here.
DEFAULT_GRID = (
    Shape(128, 3, 32, 4096, 128, 16),  # the quickstart's
    Shape(256, 2, 32, 4096, 256, 8),
    Shape(512, 3, 64, 8192, 256, 4),
    Shape(512, 4, 64, 32000, 128, 8),
    Shape(128, 2, 64, 8192, 512, 4),
)
SMOKE_GRID = (Shape(64, 2, 16, 4096, 64, 4),)


def full_grid() -> tuple[Shape, ...]:
    """Every combination of dim, vocab and seq; FFN 4x / 3x / 2x and heads of 32 / 64 / 64 by dim;
    about 4k tokens per step at dim 128, 2k above."""
    ffn = {128: 4, 256: 3, 512: 2}
    heads = {128: 32, 256: 64, 512: 64}
    return tuple(Shape(d, ffn[d], heads[d], v, s, (4096 if d == 128 else 2048) // s)
                 for d, v, s in itertools.product((128, 256, 512), (4096, 8192, 32000), (128, 256, 512)))


def run_config(shape: Shape, moe: bool, steps: int, out_dir: str, name: str) -> Config:
    """The quickstart (data, optimizer, logging and checkpoint cadence) at `shape`: 4 layers, GQA
    with half as many kv heads, 8 experts top-2 of the dense FFN's width when `moe`."""
    heads = max(shape.dim // shape.head_dim, 2)
    return load_config("configs/quickstart.yaml", [
        f"run.name={name}", f"run.out_dir={out_dir}", "mesh.data=1", f"model.dim={shape.dim}",
        f"model.hidden_dim={shape.ffn * shape.dim}", f"model.n_heads={heads}", f"model.n_kv_heads={heads // 2}",
        f"model.head_dim={shape.head_dim}", f"model.vocab_size={shape.vocab}", "model.sliding_window=null",
        f"model.max_seq_len={max(shape.seq, 128)}", f"model.moe.num_experts={8 if moe else 0}",
        f"data.seq_len={shape.seq}", f"data.batch_size={shape.batch}", f"train.steps={steps}",
        "logging.wandb=off", "logging.progress=false"])


def loop_tokens_per_s(cfg: Config) -> float:
    """Median tokens/s of a fresh run's logged windows after the first."""
    Trainer(cfg).fit()
    windows = [r["tokens_per_s"] for r in read_metrics(cfg.run_dir) if "tokens_per_s" in r]
    return statistics.median(windows[1:] if len(windows) > 1 else windows)


def torch_tokens_per_s(step: TorchStep, cfg: Config, steps: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return cfg.data.batch_size * cfg.data.seq_len / statistics.median(times)


def compare(shape: Shape, moe: bool, rounds: int, steps: int, out: str) -> dict:
    kind = "moe" if moe else "dense"
    ours, torch = [], []
    torch_step = None
    for r in range(rounds):
        cfg = run_config(shape, moe, steps, out, f"{kind}_{shape.dim}_{shape.vocab}_{shape.seq}_{r}")
        torch_step = torch_step or TorchStep(cfg)
        first = (lambda: ours.append(loop_tokens_per_s(cfg)), lambda: torch.append(torch_tokens_per_s(torch_step, cfg,
                                                                                                       steps)))
        for call in first if r % 2 == 0 else first[::-1]:
            call()
    ratio = paired(ours, torch)
    print(f"| {kind} | {shape.label} | {statistics.median(ours):,.0f} | {statistics.median(torch):,.0f} | "
          f"{ratio:.3f}x |", flush=True)
    return {"model": kind, **shape._asdict(), "ours_tokens_per_s": ours, "torch_tokens_per_s": torch, "ratio": ratio}


def breakdown(shape: Shape, moe: bool, out: str) -> None:
    """Where one step's time goes at this shape: per-op categories and the costliest ops."""
    cfg = run_config(shape, moe, 10, out, "breakdown")
    found = trace_breakdown(cfg, top=6)
    step = found["step_ms"]
    cats = ", ".join(f"{name} {ms:.0f} ms ({ms / step:.0%})" for name, ms in
                     sorted(found["categories_ms"].items(), key=lambda item: -item[1]))
    print(f"\n{'moe' if moe else 'dense'}, {shape.label}: step {step:.0f} ms; {cats}", flush=True)
    for op in found["top_ops"]:
        print(f"  {op['ms']:7.1f} ms  {op['op']:<32} {op['shape']:<40} {op['source']}", flush=True)


def overhead(rounds: int, steps: int, out: str) -> float:
    """The train loop's tokens/s over its bare compiled step's, at the quickstart's shape."""
    loop, bare = [], []
    cfg = load_config("configs/quickstart.yaml", [f"run.out_dir={out}", "mesh.data=1", f"train.steps={steps}",
                                                  "logging.wandb=off", "logging.progress=true"])
    step = OurStep(cfg)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    for r in range(rounds):
        cfg.run.name = f"overhead_{r}"
        for _ in range(2):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        bare.append(tokens * steps / (time.perf_counter() - start))
        loop.append(loop_tokens_per_s(cfg))
        print(f"  round {r + 1}/{rounds}: loop {loop[-1]:,.0f} tokens/s, bare step {bare[-1]:,.0f}", flush=True)
    ratio = paired(loop, bare)
    print(ratio_line("train loop / bare compiled step tokens/s (quickstart shape)", ratio, "target >= 0.97x",
                     ratio >= 0.97), flush=True)
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one tiny shape, one round")
    parser.add_argument("--full", action="store_true", help="every grid point (hours on 2 cores)")
    parser.add_argument("--overhead", action="store_true", help="the loop against its bare step, quickstart shape")
    parser.add_argument("--breakdown", action="store_true", help="only the per-op breakdown of the chosen shapes")
    parser.add_argument("--shapes", type=str, default=None, help="comma-separated indices into the grid, e.g. 1,3")
    parser.add_argument("--only", choices=("dense", "moe"), default=None)
    parser.add_argument("--rounds", type=int, default=None, help="default 2, smoke 1")
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default 40, smoke 20)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.smoke else 2)
    steps = args.steps or (20 if args.smoke else 40)
    print(f"# train loop vs torch eager on {jax.devices()[0].device_kind}, {threads()} threads, jax {jax.__version__}; "
          f"{rounds} round(s) of {steps} steps", flush=True)
    with tempfile.TemporaryDirectory() as out:
        if args.overhead:
            overhead(rounds, steps, out)
            return
        grid = SMOKE_GRID if args.smoke else full_grid() if args.full else DEFAULT_GRID
        if args.shapes:
            grid = tuple(grid[int(i)] for i in args.shapes.split(","))
        kinds = [k for k in (False, True) if args.only is None or args.only == ("moe" if k else "dense")]
        if args.breakdown:
            for shape, moe in itertools.product(grid, kinds):
                breakdown(shape, moe, out)
            return
        print("| model | shape | ours tokens/s (train loop) | torch tokens/s | ours / torch |\n|---|---|---:|---:|---:|")
        results = [compare(shape, moe, rounds, steps, out) for shape in grid for moe in kinds]
        if not args.smoke:
            for result in (r for r in results if r["ratio"] < TARGET):
                breakdown(Shape(*(result[f] for f in Shape._fields)), result["model"] == "moe", out)
    worst = min(results, key=lambda r: r["ratio"])
    print(ratio_line(f"worst ours/torch ({worst['model']}, dim {worst['dim']}, vocab {worst['vocab']}, seq "
                     f"{worst['seq']})", worst["ratio"], f"target >= {TARGET:g}x at every shape",
                     worst["ratio"] >= TARGET), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
