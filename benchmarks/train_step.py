"""CPU training-step throughput: tokens/s and MFU of the full train step (forward, backward,
AdamW update, as the Trainer compiles it via `build_program`, on one CPU device) for a dense
Mistral-shaped trunk and its 8-expert top-2 Mixtral version, against the same models, batch and
optimizer in HF transformers (eager attention, float32, torch.optim.AdamW, no torch.compile).

    python -m benchmarks.train_step            # ~3 minutes on 2 cores
    python -m benchmarks.train_step --json     # the table on stderr, the figures as JSON on stdout
    python -m benchmarks.train_step --smoke    # tiny trunk, 2 timed steps (the test suite)
    python -m benchmarks.train_step --profile  # where our step's time goes (~8 minutes)

Every contender (ours dense, torch dense, ours MoE, torch MoE, and the matmul peak of cost.py)
runs once per round, in alternating order, after warm-up. Every figure is a median over rounds
of a per-round quantity (a step time, a ratio of two step times of the same round, a step's
MFU against the same round's peak), so a shared machine's drifting speed cancels in the ratios.
MFU = model FLOPs (training/cost.py, the same for both implementations) per second / peak.

--profile times variants of our step against it in the same way (attention by XLA's composition,
remat, autodiff's weight gradients instead of kernels/matmul.py's, an XLA:CPU fusion option, and a
lower bound: the step's matmuls alone), then breaks one step down per XLA op from a profiler trace.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import gzip
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a file: make `mixtral_jax` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mixtral_jax.host_allocator import reexec_with_tunables  # noqa: E402

# Run under the heap settings `mixtral-jax train` restarts itself with (host_allocator.py); the
# torch peer shares the process, so it gets them too.
reexec_with_tunables()
# torch's OpenMP workers otherwise spin-wait between parallel regions, which on a loaded 2-core
# machine measured up to 2x slower, erratic torch steps: passive waiting is the stronger peer here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import numpy as np

from mixtral_jax.config import Config, DataConfig, MeshConfig, MoEConfig, ModelConfig, OptimConfig, TrainConfig, validate
from mixtral_jax.interop.hf import config_to_hf
from mixtral_jax.kernels.backend import Kernels
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.parallel.mesh import batch_sharding, make_mesh
from mixtral_jax.training.cost import flops_per_token, measure_matmul_peak
from mixtral_jax.training.program import ModelFactory, build_program

# Big enough that matmuls dominate on a 2-core CPU (every matmul has >= 256 rows and a
# 512-wide side; 106 model GFLOP per dense step), small enough that a step takes ~1-3 s there.
# MoE: 8 experts of the same width, top-2: the dropless dispatch sees 2 x 1024 slots, ~256 rows
# per expert, laid out on CPU in runs of 64-row half-blocks or a batched region (kernels/grouped_cpu.py).
# Layers fully unrolled (model.scan_unroll = n_layers: 0.94-0.95x the looped step, measured):
# the peer has no scan, and at 4 layers compile time is no concern (compile_time.py keeps the loop).
TRUNK = dict(vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64, hidden_dim=1536,
             max_seq_len=256, sliding_window=None, dtype="float32", param_dtype="float32", remat="none", scan_unroll=4)
TRUNK_SHAPE = (4, 256)  # batch, seq
SMOKE = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
             max_seq_len=64, sliding_window=None, dtype="float32", param_dtype="float32", remat="none")
SMOKE_SHAPE = (2, 64)
MOE = MoEConfig(num_experts=8, top_k=2, dispatch="dropless")
OPTIM = OptimConfig(lr=3e-4, warmup_steps=10, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0)


def threads() -> int:
    """Cores this process may use: XLA:CPU sizes its intra-op pool from them; torch gets as many."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_config(model: dict, moe: MoEConfig | None, batch: int, seq: int) -> Config:
    """A validated run config on a one-device mesh (data=1: not -1, which would fill every host
    device when XLA_FLAGS asks for several)."""
    model_cfg = ModelConfig(**{**model, "max_seq_len": max(model["max_seq_len"], seq)}, moe=moe or MoEConfig())
    cfg = Config(model=model_cfg, data=DataConfig(seq_len=seq, batch_size=batch), optim=OPTIM,
                 train=TrainConfig(steps=1000), mesh=MeshConfig(data=1))
    validate(cfg)
    return cfg


def with_model(cfg: Config, **fields: Any) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields))


def random_batch(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """One unpacked batch (a single document per row) in the pipeline's layout."""
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1].copy(), "targets": tokens[:, 1:].copy(), "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "loss_mask": np.ones((b, t), np.float32)}


class OurStep:
    """The Trainer's compiled train step on the first device; each call runs one step to completion."""

    def __init__(self, cfg: Config, seed: int = 0, options: dict[str, Any] | None = None,
                 kernels: Kernels | None = None, model_factory: ModelFactory = Transformer):
        """options: XLA debug options for this compile only (jax compiler_options). kernels: the
        model's kernels, when a variant measures another choice than the backend's default.
        model_factory: the model (a prototype of another layout, say; see layer_layout.py)."""
        mesh = make_mesh(cfg.mesh, jax.devices()[:1])
        program = build_program(cfg, mesh, functools.partial(model_factory, kernels=kernels))
        self.state = program.init_state()
        self.batch = jax.device_put(random_batch(cfg, seed), batch_sharding(mesh))
        start = time.perf_counter()
        self.step = program.train_step.lower(self.state, self.batch).compile(compiler_options=options or {})
        self.compile_s = time.perf_counter() - start
        self.loss = float("nan")

    def __call__(self) -> None:
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.loss = float(metrics["loss"])


class TorchStep:
    """The HF transformers peer: MistralForCausalLM / MixtralForCausalLM, eager attention, float32,
    torch.optim.AdamW with our hyperparameters (norms undecayed, global-norm clipping), the
    Mixtral router's load-balancing loss added as ours is (output_router_logits)."""

    def __init__(self, cfg: Config, seed: int = 0, experts_impl: str | None = None):
        import torch
        import transformers

        torch.set_num_threads(threads())
        torch.manual_seed(seed)
        fields = {k: v for k, v in config_to_hf(cfg.model).items() if k not in ("architectures", "model_type")}
        fields.update(use_cache=False, attn_implementation="eager")
        self.aux_coef = cfg.model.moe.aux_loss_coef if cfg.model.is_moe else 0.0
        if cfg.model.is_moe:
            fields.update(output_router_logits=True, **({"experts_implementation": experts_impl} if experts_impl else {}))
            self.model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**fields))
        else:
            self.model = transformers.MistralForCausalLM(transformers.MistralConfig(**fields))
        self.model.train()
        self.experts_impl = getattr(self.model.config, "_experts_implementation", None) if cfg.model.is_moe else None
        o = cfg.optim
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if "norm" not in n], "weight_decay": o.weight_decay},
                  {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps)
        self.clip = o.clip_norm
        batch = {k: torch.from_numpy(v).long() for k, v in random_batch(cfg, seed).items() if k != "loss_mask"}
        self.inputs, self.targets, self.positions = batch["inputs"], batch["targets"], batch["positions"]
        self.torch, self.loss = torch, float("nan")

    def __call__(self) -> None:
        torch = self.torch
        out = self.model(input_ids=self.inputs, position_ids=self.positions)
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), self.targets.reshape(-1))
        if self.aux_coef:
            # HF returns the Switch loss times k (its coef is ours / k: interop.hf.config_to_hf)
            loss = loss + self.model.config.router_aux_loss_coef * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())


def peak_call() -> float:
    """cost.measure_matmul_peak as a contender: run in the rounds, it sees the steps' machine load."""
    return measure_matmul_peak("float32", reps=3)


def interleave(calls: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, pause: float = 0.05,
               log: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every contender (a call returning a float records that value), after
    `warmup` untimed calls, `rounds` times in alternating order. The pause before each call lets the
    previous runtime's worker threads (OpenMP, XLA's pool) go idle instead of holding the cores."""
    for call in calls.values():
        [call() for _ in range(warmup)]
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            time.sleep(pause)
            start = time.perf_counter()
            value = calls[name]()
            samples[name].append(value if isinstance(value, float) else time.perf_counter() - start)
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {samples[n][-1]:.3g}" for n in names))
    return samples


def ratio_line(name: str, value: float, target: str, ok: bool) -> str:
    """The one format every benchmark prints its ratios in (the smoke tests parse it)."""
    return f"ratio {name}: {value:.3f}x ({target}) {'PASS' if ok else 'MISS'}"


def paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[r] / b[r]: both were measured in the same round."""
    return statistics.median(x / y for x, y in zip(a, b))


def matmul_bound(cfg: Config) -> Callable[[], None]:
    """A lower bound on the step: every matmul of its forward and backward pass (y = a @ w,
    da = dy @ w^T, dw = a^T @ dy with a^T already in memory, as kernels/matmul.py lays it out on
    CPU) as independent dot_generals in one jit, and nothing else. MoE experts get a perfectly
    balanced N k / E rows each (no block padding), attention its full T x T score matrices."""
    m, (b, t) = cfg.model, (cfg.data.batch_size, cfg.data.seq_len)
    n, hd = b * t, m.head_dim
    shapes = []  # (batch, rows, contraction, columns) of each forward matmul
    for _ in range(m.n_layers):
        shapes += [(1, n, m.dim, m.n_heads * hd), (1, n, m.dim, 2 * m.n_kv_heads * hd),
                   (b * m.n_heads, t, hd, t), (b * m.n_heads, t, t, hd), (1, n, m.n_heads * hd, m.dim)]
        e, rows = (m.moe.num_experts, n * m.moe.top_k // m.moe.num_experts) if m.is_moe else (1, n)
        shapes += [(e, rows, m.dim, 2 * m.hidden_dim), (e, rows, m.hidden_dim, m.dim)] + [(1, n, m.dim, e)] * m.is_moe
    shapes.append((1, n, m.dim, m.vocab_size))
    rng = np.random.default_rng(0)
    operands = [tuple(jax.device_put(rng.standard_normal(s, np.float32), jax.devices()[0])
                      for s in ((g, r, k), (g, k, r), (g, k, c), (g, r, c))) for g, r, k, c in shapes]
    batch_dims = ((0,), (0,))

    @jax.jit
    def run(operands):  # y = a w, da = dy w^T, dw = a_t dy (a_t: a^T stored)
        return [jax.lax.dot_general(x, y, (dims, batch_dims)) for a, a_t, w, dy in operands
                for x, y, dims in ((a, w, ((2,), (1,))), (dy, w, ((2,), (2,))), (a_t, dy, ((2,), (1,))))]

    return lambda: jax.block_until_ready(run(operands))


def _category(name: str, opcode: str) -> str | None:
    if opcode in ("while", "conditional", "call"):  # their bodies' ops are traced on their own
        return None
    if opcode == "dot" or name.startswith(("ynn_fusion", "xnn_fusion", "onednn")) or "dot" in name:
        return "matmul"
    if "transpose" in name or name.startswith("copy") or opcode in ("copy", "transpose"):
        return "copy / transpose (fused elementwise)"
    if any(w in name or w == opcode for w in ("gather", "scatter", "sort")):
        return "gather / scatter / sort"
    return "collective" if opcode.startswith(("all-", "reduce-scatter", "collective")) else "other elementwise / reduce"


def profile_ops(run: Callable[[], Any], hlo_text: str, *, steps: int, top: int, shape_chars: int = 40,
                source_chars: int = 70) -> dict[str, Any]:
    """Per-op time of `run()` (one step, run to completion, of a program compiled with
    xla_cpu_enable_xprof_traceme, whose optimized HLO is `hlo_text`) from a jax.profiler trace of
    `steps` runs after two warm-up runs: step time, time by category and the `top` costliest ops
    with their shapes and source op names."""
    run(), run()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        with gzip.open(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    hlo = {}  # instruction name -> (opcode, shape, op_name)
    for line in hlo_text.splitlines():
        if m := re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(", line):
            source = re.search(r'op_name="([^"]*)"', line)
            hlo[m.group(1)] = (m.group(3), m.group(2), source.group(1) if source else "")
    ms: dict[str, float] = {}
    for e in (e for e in events if e.get("ph") == "X" and e.get("name") in hlo):
        ms[e["name"]] = ms.get(e["name"], 0.0) + e.get("dur", 0) / 1e3 / steps
    wall = sum(e.get("dur", 0) for e in events if e.get("name") == "ThunkExecutor::Execute (wait for completion)")
    cats: dict[str, float] = {}
    for name, t in ms.items():
        if cat := _category(name, hlo[name][0]):
            cats[cat] = cats.get(cat, 0.0) + t
    leaves = sorted(((t, n) for n, t in ms.items() if _category(n, hlo[n][0])), reverse=True)[:top]
    return {"step_ms": wall / 1e3 / steps, "categories_ms": cats,
            "top_ops": [{"op": n, "ms": t, "shape": hlo[n][1][:shape_chars], "source": hlo[n][2][-source_chars:]}
                        for t, n in leaves]}


def trace_breakdown(cfg: Config, top: int = 12) -> dict[str, Any]:
    """Per-op time of our step from a jax.profiler trace (XLA:CPU emits one event per thunk when
    compiled with xla_cpu_enable_xprof_traceme), joined with the optimized HLO for shapes and
    source op names. Thunks may overlap, so op times can sum to more than the step; a thunk that
    hands its work to the thread pool may end before the work does (under-counted)."""
    step = OurStep(cfg, options={"xla_cpu_enable_xprof_traceme": True})
    return profile_ops(step, step.step.as_text(), steps=2, top=top)


YNN_FUSION = {"xla_cpu_experimental_ynn_fusion_type":
              "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"}


def profile(cfg: Config, name: str, rounds: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Our step against variants of itself, and its per-op breakdown."""
    attention = getattr(cfg.model, "attention_impl", None)
    variants: dict[str, Callable[[], Any]] = {"ours": OurStep(cfg)}
    default = Kernels.for_backend()
    variants["attention by XLA's composition"] = OurStep(with_model(cfg, attention_impl="dot_product"),
                                                         kernels=default.replace(attention_library="xla"))
    variants["remat=dots_saveable"] = OurStep(with_model(cfg, remat="dots_saveable"))
    variants["autodiff weight gradients"] = OurStep(cfg, kernels=default.replace(matmul_custom_gradient=False))
    variants["XLA ynn fusion of eltwise+reduce"] = OurStep(cfg, options=YNN_FUSION)
    variants["matmuls only (lower bound)"] = matmul_bound(cfg)
    variants["peak"] = peak_call
    samples = interleave(variants, rounds, warmup=2, log=say)
    flops = flops_per_token(cfg.model, cfg.data.seq_len).train * cfg.data.batch_size * cfg.data.seq_len
    out: dict[str, Any] = {"attention_impl": attention, "time_vs_ours": {}}
    say(f"\n## profile {name} (attention_impl {attention}): time / our step, paired median of {rounds} rounds")
    for variant in variants:
        if variant not in ("ours", "peak"):
            out["time_vs_ours"][variant] = value = paired(samples[variant], samples["ours"])
            say(f"profile {name} {variant}: {value:.3f}x")
    out["mfu"] = statistics.median(flops / t / (p * 1e12) for t, p in zip(samples["ours"], samples["peak"]))
    bound = out["time_vs_ours"]["matmuls only (lower bound)"]
    say(f"profile {name}: MFU {out['mfu']:.1%}; the step's matmuls alone would take {bound:.0%} of it "
        f"(MFU {out['mfu'] / bound:.1%}): {1 - bound:.0%} of the step is not matmul work at the bound's speed")
    del variants  # free their states before the traced compile
    out["breakdown"] = b = trace_breakdown(cfg)
    total = sum(b["categories_ms"].values())
    say(f"profile {name} breakdown of one traced step ({b['step_ms']:.0f} ms wall, ops sum {total:.0f} ms):")
    for cat, t in sorted(b["categories_ms"].items(), key=lambda kv: -kv[1]):
        say(f"  {cat:<40} {t:8.1f} ms  {t / total:6.1%}")
    say("  top ops (ms per step, shape, source):\n" + "\n".join(
        f"  {op['ms']:8.1f} {op['op']:<34} {op['shape']:<40} {op['source']}" for op in b["top_ops"]))
    return out


def benchmark(cfgs: dict[str, Config], rounds: int, warmup: int, hf_experts: str | None,
              say: Callable[[str], None]) -> dict[str, Any]:
    """Ours and torch for every model, interleaved with the peak; the table and ratio lines."""
    calls: dict[str, Callable[[], Any]] = {}
    for name, cfg in cfgs.items():
        ours = calls[f"ours {name}"] = OurStep(cfg)
        theirs = calls[f"torch {name}"] = TorchStep(cfg, experts_impl=hf_experts)
        say(f"  ours {name}: compiled in {ours.compile_s:.1f} s; torch {name}: HF experts_implementation "
            f"{theirs.experts_impl}")
    calls["peak"] = peak_call
    samples = interleave(calls, rounds, warmup=warmup, log=say)
    peak = samples["peak"]
    results: dict[str, Any] = {"peak_tflops": statistics.median(peak), "peak_samples": peak, "runs": {}, "ratios": {}}
    say(f"\nmatmul peak (cost.measure_matmul_peak), median of rounds: {statistics.median(peak) * 1e3:.1f} GFLOP/s "
        f"(range {min(peak) * 1e3:.0f}-{max(peak) * 1e3:.0f})")
    say("| run | step ms | tokens/s | model GFLOP/step | GFLOP/s | MFU | loss |\n|---|---:|---:|---:|---:|---:|---:|")
    for run, step in list(calls.items())[:-1]:  # all but the peak
        cfg = cfgs[run.split()[1]]
        tokens = cfg.data.batch_size * cfg.data.seq_len
        flop = flops_per_token(cfg.model, cfg.data.seq_len).train * tokens
        step_s = statistics.median(samples[run])
        r = {"step_s": step_s, "tokens_per_s": tokens / step_s, "model_gflop_per_step": flop / 1e9,
             "gflop_per_s": flop / step_s / 1e9, "loss": step.loss, "samples_s": samples[run],
             "mfu": statistics.median(flop / t / (p * 1e12) for t, p in zip(samples[run], peak)),
             "compile_s": getattr(step, "compile_s", None)}
        results["runs"][run] = r
        say(f"| {run} | {1e3 * step_s:.1f} | {r['tokens_per_s']:.0f} | {flop / 1e9:.1f} | {r['gflop_per_s']:.1f} | "
            f"{r['mfu']:.1%} | {step.loss:.3f} |")
        if not math.isfinite(step.loss):
            raise SystemExit(f"{run}: non-finite loss {step.loss}")
    runs, ratios, lines = results["runs"], results["ratios"], []
    for name in cfgs:
        ratios[f"{name} ours/torch tokens/s"] = v = paired(samples[f"torch {name}"], samples[f"ours {name}"])
        aim = f"target >= 1.0x, aim 1.5x {'reached' if v >= 1.5 else 'not reached'}"
        lines.append(ratio_line(f"{name} ours/torch tokens/s", v, aim, v >= 1.0))
    if "dense" in cfgs:
        ratios["dense MFU / measured peak"] = v = runs["ours dense"]["mfu"]
        lines.append(ratio_line("dense MFU / measured peak", v, "target >= 0.50x", v >= 0.5))
    if len(cfgs) == 2:
        ratios["moe/dense model FLOPs"] = flops = (runs["ours moe"]["model_gflop_per_step"]
                                                  / runs["ours dense"]["model_gflop_per_step"])
        for impl in ("ours", "torch"):
            ratios[f"{impl} moe/dense step time"] = v = paired(samples[f"{impl} moe"], samples[f"{impl} dense"])
            target = f"target <= 1.15 x model-FLOPs ratio {flops:.3f} = {1.15 * flops:.3f}x" if impl == "ours" else "info"
            lines.append(ratio_line(f"{impl} moe/dense step time", v, target, impl != "ours" or v <= 1.15 * flops))
    say("\n" + "\n".join(lines))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny trunk, 2 timed rounds (< 60 s)")
    parser.add_argument("--json", action="store_true", help="figures as JSON on stdout, the table on stderr")
    parser.add_argument("--profile", action="store_true", help="variants of our step and a per-op breakdown")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7, profile 5, smoke 2)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4, smoke 2)")
    parser.add_argument("--seq", type=int, default=None, help="default 256, smoke 64")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a model field, e.g. --set dim=384 --set attention_impl=plain (repeatable)")
    parser.add_argument("--hf-experts", default=None, help="HF experts_implementation (default: HF's choice)")
    parser.add_argument("--only", choices=("dense", "moe"), default=None, help="one model only")
    args = parser.parse_args()
    out = sys.stderr if args.json else sys.stdout

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    trunk, (batch, seq) = (dict(SMOKE), SMOKE_SHAPE) if args.smoke else (dict(TRUNK), TRUNK_SHAPE)
    for item in args.set:
        key, value = item.split("=", 1)
        trunk[key] = None if value == "none" else int(value) if value.lstrip("-").isdigit() else value
    batch, seq = args.batch or batch, args.seq or seq
    rounds = args.rounds or (2 if args.smoke else 5 if args.profile else 7)
    models = {name: moe for name, moe in (("dense", None), ("moe", MOE)) if args.only in (None, name)}
    cfgs = {name: make_config(trunk, moe, batch, seq) for name, moe in models.items()}

    import torch

    attention = getattr(cfgs[next(iter(cfgs))].model, "attention_impl", "plain")
    say(f"# train step on {jax.devices()[0].device_kind} (1 of {jax.device_count()} JAX device(s)), "
        f"{threads()} threads, jax {jax.__version__}, torch {torch.__version__}; float32, batch {batch}, seq {seq}, "
        f"dim {trunk['dim']}, layers {trunk['n_layers']}, heads {trunk['n_heads']}/{trunk['n_kv_heads']}, "
        f"hidden {trunk['hidden_dim']}, vocab {trunk['vocab_size']}, attention_impl {attention}, remat "
        f"{trunk['remat']}, scan_unroll {trunk.get('scan_unroll', 1)}; MoE {MOE.num_experts} experts top-{MOE.top_k} {MOE.dispatch}; {rounds} rounds; "
        f"GLIBC_TUNABLES {os.environ.get('GLIBC_TUNABLES')}")
    meta = {"threads": threads(), "batch": batch, "seq": seq, "trunk": trunk, "rounds": rounds,
            "attention_impl": attention, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    results = ({name: profile(cfg, name, rounds, say) for name, cfg in cfgs.items()} if args.profile
               else benchmark(cfgs, rounds, 1 if args.smoke else 3, args.hf_experts, say))
    if args.json:
        print(json.dumps({**meta, **results}, indent=1))


if __name__ == "__main__":
    main()
