"""GPU check: bf16 training-step throughput and MFU of a ~1B dense trunk and its 8-expert
top-2 version at sequence length 2048, on whatever accelerator JAX sees.

Needs only jax, flax, optax (no data pipeline: random tokens). Prints one table; `--smoke`
shrinks everything so the same code path runs on a CPU in seconds (the test suite does).

    python benchmarks/gpu_check.py            # on one H100/H200: a few minutes
    python benchmarks/gpu_check.py --smoke    # anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mixtral_jax.config import Config, DataConfig, MoEConfig, ModelConfig, OptimConfig, validate
from mixtral_jax.models.transformer import Transformer, param_counts
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


def build(model: dict, moe: MoEConfig, seq_len: int, batch: int) -> Config:
    cfg = Config(model=ModelConfig(**model, moe=moe), data=DataConfig(seq_len=seq_len, batch_size=batch),
                 optim=OptimConfig(warmup_steps=2))
    validate(cfg)
    return cfg


def time_train_step(cfg: Config, steps: int, under_mesh: bool = False) -> dict:
    """Compile once, then time `steps` steps of the full train step (fwd + bwd + AdamW).
    under_mesh: trace it under a one-device mesh as the Trainer does, so the MoE dispatch takes
    its shard_map (expert-parallel) path with a local exchange."""
    tx = make_optimizer(cfg.optim, 1000)
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    del model
    state = {"step": jnp.int32(0), "params": params, "model_state": model_state, "opt_state": tx.init(params),
             "rng": jax.random.PRNGKey(0)}
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, t), np.int32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "loss_mask": np.ones((b, t), np.float32)}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, float32: check the code path on a CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    trunk, seq = (SMOKE, 64) if args.smoke else (TRUNK, 2048)
    steps = args.steps or (2 if args.smoke else 10)
    batch = args.batch or (2 if args.smoke else 4)
    hardware = detect_hardware()
    peak, source = peak_tflops(hardware, dtype=trunk["dtype"])
    print(f"device: {jax.devices()[0].device_kind} ({hardware}); peak {peak:g} TFLOP/s ({source}); "
          f"jax {jax.__version__}; seq {seq}, batch {batch}", flush=True)
    moe = build({**trunk, "n_layers": max(trunk["n_layers"] // 2, 1)},
                MoEConfig(num_experts=8, top_k=2, dispatch="dropless"), seq, batch)
    runs = {  # name -> (config, traced under a mesh)
        "dense": (build(trunk, MoEConfig(num_experts=0), seq, batch), False),
        "moe 8x top-2 (dropless)": (moe, False),
        "moe, under a mesh": (moe, True),
    }
    results = {}
    print(f"{'model':<26} {'layers':>6} {'params':>8} {'active':>8} {'compile s':>9} {'step s':>8} "
          f"{'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for name, (cfg, under_mesh) in runs.items():
        r = time_train_step(cfg, steps, under_mesh)
        r["mfu"] = r["model_tflops_per_s"] / peak
        results[name] = {**r, "n_layers": cfg.model.n_layers, "model": dataclasses.asdict(cfg.model)}
        print(f"{name:<26} {cfg.model.n_layers:>6} {r['params_total'] / 1e9:>7.2f}B {r['params_active'] / 1e9:>7.2f}B "
              f"{r['compile_s']:>9.1f} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} "
              f"{r['model_tflops_per_s']:>8.1f} {r['mfu']:>6.1%}", flush=True)
        assert np.isfinite(r["loss"]), f"{name}: non-finite loss {r['loss']}"
    mesh_ratio = results["moe, under a mesh"]["step_s"] / results["moe 8x top-2 (dropless)"]["step_s"]
    print(f"MoE step time under a one-device mesh (shard_map dispatch) / plain jit: {mesh_ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "peak_tflops": peak, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
