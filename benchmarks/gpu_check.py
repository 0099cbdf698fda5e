"""GPU check: bf16 training-step throughput and MFU of a ~1B dense trunk and its 8-expert
top-2 version at sequence length 2048, on whatever accelerator JAX sees.

Needs only jax, flax, optax (no data pipeline: random tokens). Prints one table; `--smoke`
shrinks everything so the same code path runs on a CPU in seconds (the test suite does).

    python -m benchmarks.gpu_check            # on one H100/H200: a few minutes
    python -m benchmarks.gpu_check --smoke    # anywhere
    python -m benchmarks.gpu_check --exchange [--smoke]  # the expert exchange strategies only

The batch is rows of packed documents (benchmarks/attention.py's `packed_rows`), so the document
mask is exercised as in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from benchmarks.attention import packed_rows
from mixtral_jax.config import Config, DataConfig, MoEConfig, ModelConfig, OptimConfig, validate
from mixtral_jax.kernels.backend import Kernels
from mixtral_jax.models.params import param_counts
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.parallel.mesh import MESH_AXES, traced_under
from mixtral_jax.training.cost import detect_hardware, flops_per_token, peak_tflops
from mixtral_jax.training.optim import learning_rate_schedule, make_optimizer
from mixtral_jax.training.step import make_train_step

# ~0.9B dense trunk (Mistral-shaped: GQA 16:8, SwiGLU); its MoE version has 8 experts of the
# same width, top-2. With float32 master weights and Adam moments (16 bytes / parameter) the
# full-depth 8-expert model (4.8B) does not fit one 80 GB H100, so the MoE run uses half the
# depth; MFU is per-token throughput against peak and does not depend on depth.
TRUNK = dict(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, n_kv_heads=8, head_dim=128, hidden_dim=5632,
             max_seq_len=2048, sliding_window=None, dtype="bfloat16", param_dtype="float32", remat="dots_saveable")
SMOKE = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
             max_seq_len=64, sliding_window=None, dtype="float32", param_dtype="float32", remat="none")


SMOKE_VARIANTS = ("dense", "moe dropless, mesh")  # the Trainer's own paths; the rest differ only in config


def build(model: dict, moe: MoEConfig, seq_len: int, batch: int) -> Config:
    cfg = Config(model=ModelConfig(**model, moe=moe), data=DataConfig(seq_len=seq_len, batch_size=batch),
                 optim=OptimConfig(warmup_steps=2))
    validate(cfg)
    return cfg


def time_train_step(cfg: Config, steps: int, under_mesh: bool = False, kernels: Kernels | None = None) -> dict:
    """Compile once, then time `steps` steps of the full train step (fwd + bwd + AdamW).
    under_mesh: trace it under a one-device mesh as the Trainer does, so the MoE dispatch takes
    its shard_map (expert-parallel) path with a local exchange. kernels: the model's kernels."""
    tx = make_optimizer(cfg.optim, 1000)
    model = Transformer(cfg.model, kernels=kernels, rngs=nnx.Rngs(0))
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    del model
    state = {"step": jnp.int32(0), "params": params, "model_state": model_state, "opt_state": tx.init(params),
             "rng": jax.random.PRNGKey(0)}
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
    segment_ids, positions = packed_rows(b, t)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids, "positions": positions,
             "loss_mask": (segment_ids > 0).astype(np.float32)}
    batch = jax.device_put(batch)
    step_fn = make_train_step(cfg, graphdef, tx, learning_rate_schedule(cfg.optim, 1000))
    if under_mesh:
        step_fn = traced_under(Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1, 1), MESH_AXES), step_fn)
    step = jax.jit(step_fn, donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    loss = float(jax.device_get(metrics["loss"]))
    elapsed = (time.perf_counter() - start) / steps
    fpt = flops_per_token(cfg.model, t).train
    tokens_per_s = b * t / elapsed
    return {"params_total": param_counts(cfg.model)["total"], "params_active": param_counts(cfg.model)["active"],
            "compile_s": compile_s, "step_s": elapsed, "tokens_per_s": tokens_per_s,
            "model_tflops_per_s": tokens_per_s * fpt / 1e12, "loss": loss}


class Variant(NamedTuple):
    cfg: Config
    under_mesh: bool = False  # traced under a one-device mesh, as the Trainer runs it
    segment_bounds: tuple[int, ...] | None = None  # Kernels.segment_bounds; None = the default, () = the mask
    grouped: str = "auto"  # model.grouped_kernel
    fp8: bool = False  # model.fp8


def variants(trunk: dict, seq: int, batch: int) -> dict[str, Variant]:
    """name -> Variant. The first of each model is the default configuration; the others change
    one lever each, so every ratio is measured in this run."""
    half = {**trunk, "n_layers": max(trunk["n_layers"] // 2, 1)}
    dense, dropless = MoEConfig(num_experts=0), MoEConfig(num_experts=8, top_k=2, dispatch="dropless")
    capacity = dataclasses.replace(dropless, dispatch="capacity")
    return {
        "dense": Variant(build(trunk, dense, seq, batch)),
        "dense, document mask": Variant(build(trunk, dense, seq, batch), segment_bounds=()),
        "dense, batch x2": Variant(build(trunk, dense, seq, 2 * batch)),
        "dense, batch /2": Variant(build(trunk, dense, seq, max(batch // 2, 1))),
        "moe dropless": Variant(build(half, dropless, seq, batch)),
        "moe dropless, document mask": Variant(build(half, dropless, seq, batch), segment_bounds=()),
        "moe dropless, batch x2": Variant(build(half, dropless, seq, 2 * batch)),
        "moe capacity 1.25": Variant(build(half, capacity, seq, batch)),
        "moe dropless, mesh": Variant(build(half, dropless, seq, batch), under_mesh=True),
        "moe dropless, tokamax": Variant(build(half, dropless, seq, batch), grouped="tokamax"),
        "moe dropless, fp8": Variant(build(half, dropless, seq, batch), fp8=True),
        "dense, fp8": Variant(build(trunk, dense, seq, batch), fp8=True),
        "moe dropless, remat none": Variant(build({**half, "remat": "none"}, dropless, seq, batch)),
        "dense, plain attention": Variant(build({**trunk, "attention_impl": "plain"}, dense, seq, batch)),
        "dense, remat none": Variant(build({**trunk, "remat": "none"}, dense, seq, batch)),
    }


def run_variant(variant: Variant, steps: int) -> dict:
    kernels = Kernels.for_backend().with_choices(variant.grouped, variant.fp8)
    if variant.segment_bounds is not None:
        kernels = kernels.replace(segment_bounds=variant.segment_bounds)
    return time_train_step(variant.cfg, steps, variant.under_mesh, kernels)


def exchange_check(smoke: bool) -> None:
    """The expert-parallel exchange strategies (parallel/expert_parallel.py) over every visible
    device as the expert axis, the gpu_check MoE layer's shapes, forward + backward: each one's
    time and its gradients against the padded exchange's. On one GPU the exchange moves nothing
    between devices, so this checks the ragged collective runs and agrees, and times its
    bookkeeping (sizes all_gather, offsets); the exchange's own cost needs expert > 1. Then the
    per-layer buffer sizes of each strategy for Mixtral 8x7B over expert=8."""
    from benchmarks.grouped_matmul import timed
    from mixtral_jax.models.dispatch import Experts
    from mixtral_jax.parallel.expert_parallel import EXCHANGES, exchange_rows, expert_parallel_swiglu

    devices = jax.devices()
    size = len(devices)
    mesh = Mesh(np.asarray(devices).reshape([size if a == "expert" else 1 for a in MESH_AXES]), MESH_AXES)
    n, e, k, d, h = (64 * size, 8, 2, 32, 64) if smoke else (16384, 8, 2, 2048, 5632)
    dtype = jnp.float32 if smoke else jnp.bfloat16
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(n, e)) + np.linspace(0, 1, e), jnp.float32)
    weights, ids = jax.lax.top_k(jax.nn.softmax(logits), k)
    keep = jnp.ones(ids.shape, bool)
    args = (jnp.asarray(rng.normal(size=(n, d)), dtype), weights.astype(dtype),
            *(jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), dtype) for s in ((e, d, h), (e, d, h), (e, h, d))))
    grouped = Kernels.for_backend().grouped.buffer
    print(f"exchange check: {size} device(s) as the expert axis, {n} tokens top-{k}, {e} experts, {d} -> {h}, "
          f"{jnp.dtype(dtype).name}", flush=True)
    reference = None
    for name in ("padded", "ragged"):
        if name == "ragged" and jax.default_backend() == "cpu":
            print("exchange ragged: skipped (XLA:CPU has no ragged_all_to_all; tests emulate it)", flush=True)
            continue

        def loss(x, w, wg, wu, wd, name=name):
            y = expert_parallel_swiglu(mesh, x, ids, w, keep, Experts(wg, wu, wd), grouped=grouped,
                                       exchange=EXCHANGES[name])
            return jnp.sum(y.astype(jnp.float32) ** 2)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))
        try:
            _, grads = step(*args)
            seconds = timed(step, args, 2 if smoke else 10)
        except Exception as exc:  # noqa: BLE001 - reported; the padded row still stands
            print(f"exchange {name}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            continue
        reference = reference or grads
        err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))) /
                        (float(jnp.max(jnp.abs(r.astype(jnp.float32)))) + 1e-30)) for g, r in zip(grads, reference))
        print(f"exchange {name:<7} {seconds * 1e3:8.2f} ms forward + backward; max grad error / max |grad| "
              f"against padded {err:.1e}", flush=True)
    slots, row_gib = 4096 * 2, 4096 * 2 / 2**30  # Mixtral 8x7B: 4096 tokens per device, top-2, dim 4096, bf16
    for name in ("padded", "ragged"):
        rows = exchange_rows(name, slots, 8, slots, 8 * slots)
        print(f"exchange buffers {name}, Mixtral 8x7B over expert=8, 4096 tokens per device, per layer: "
              + ", ".join(f"{part} {count * row_gib:.2f} GiB" for part, count in rows.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, float32: check the code path on a CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--only", action="append", default=[], help="run only this variant (repeatable; names as printed)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no new variant after this many seconds (the whole check must fit 12 minutes)")
    parser.add_argument("--exchange", action="store_true", help="only the expert-exchange check (exchange_check.py)")
    parser.add_argument("--json", help="also write the results to this file (rewritten after every variant)")
    args = parser.parse_args()
    if args.exchange:
        exchange_check(args.smoke)
        return
    began = time.perf_counter()
    trunk, seq = (SMOKE, 64) if args.smoke else (TRUNK, 2048)
    steps = args.steps or (2 if args.smoke else 10)
    batch = args.batch or (2 if args.smoke else 8)
    hardware = detect_hardware()
    peak, source = peak_tflops(hardware, dtype=trunk["dtype"])
    print(f"device: {jax.devices()[0].device_kind} ({hardware}); peak {peak:g} TFLOP/s ({source}); "
          f"jax {jax.__version__}; seq {seq}, batch {batch}", flush=True)
    runs = {name: run for name, run in variants(trunk, seq, batch).items()
            if name in (args.only or (SMOKE_VARIANTS if args.smoke else [name]))}
    results: dict[str, dict] = {}
    print(f"{'variant':<32} {'batch':>5} {'layers':>6} {'params':>8} {'active':>8} {'compile s':>9} {'step s':>8} "
          f"{'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}", flush=True)
    for name, variant in runs.items():
        cfg = variant.cfg
        if time.perf_counter() - began > args.budget_s:
            print(f"{name:<32} skipped: the {args.budget_s:.0f} s budget is spent", flush=True)
            continue
        try:  # one variant failing (a kernel the card lacks, memory) must not cost the others
            r = run_variant(variant, steps)
        except Exception as e:  # noqa: BLE001 - reported, and the check goes on
            print(f"{name:<32} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            results[name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        r["mfu"] = r["model_tflops_per_s"] / peak
        results[name] = {**r, "n_layers": cfg.model.n_layers, "model": dataclasses.asdict(cfg.model)}
        print(f"{name:<32} {cfg.data.batch_size:>5} {cfg.model.n_layers:>6} {r['params_total'] / 1e9:>7.2f}B "
              f"{r['params_active'] / 1e9:>7.2f}B "
              f"{r['compile_s']:>9.1f} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['model_tflops_per_s']:>8.1f} {r['mfu']:>6.1%}", flush=True)
        assert np.isfinite(r["loss"]), f"{name}: non-finite loss {r['loss']}"
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": jax.devices()[0].device_kind, "peak_tflops": peak, "results": results}, f,
                          indent=2)
    for name in runs:
        base = "dense" if name.startswith("dense") else "moe dropless"
        if name != base and "step_s" in results.get(name, {}) and "step_s" in results.get(base, {}):
            print(f"step time {name} / {base}: {results[name]['step_s'] / results[base]['step_s']:.2f}x")
    if args.smoke and any("error" in r for r in results.values()):
        raise SystemExit("a variant failed")


if __name__ == "__main__":
    main()
