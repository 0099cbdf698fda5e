"""Attention kernels, forward + backward: the model's plain jnp attention (scores materialised,
float32 softmax) against `jax.nn.dot_product_attention` (cuDNN flash attention on NVIDIA GPUs,
XLA elsewhere), causal and with a Mistral sliding window. Prints time ratios measured in one run
and the largest output difference, so the swap can be judged on numbers.

    python benchmarks/attention.py            # accelerator: bf16, seq 2048, 16 heads (GQA 16:8), dim 128
    python benchmarks/attention.py --smoke    # anywhere, small shapes
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.models.attention import attention_mask, dot_product_attention


def _time(fn, *args, reps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    b, t, h, kv, d = (1, 128, 4, 2, 32) if args.smoke else (4, 2048, 16, 8, 128)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    reps = args.reps or (2 if args.smoke else 20)
    gpu = jax.devices()[0].platform == "gpu"
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), dtype) for n in (h, kv, kv))
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    segments = jnp.ones((b, t), jnp.int32)
    print(f"device {jax.devices()[0].device_kind}; b {b}, seq {t}, heads {h}/{kv}, head_dim {d}, {jnp.dtype(dtype).name}")
    print(f"{'mask':<18} {'plain ms':>9} {'jax.nn ms':>9} {'plain/jax.nn':>12} {'max |diff|':>10}")
    for label, window in (("causal", None), (f"window {t // 4}", t // 4)):
        mask = attention_mask(positions, positions, segments, segments, window)

        def plain(q, k, v):
            return dot_product_attention(q, k, v, mask)

        def library(q, k, v):
            local = None if window is None else (window - 1, 0)
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                                implementation="cudnn" if gpu else None)

        def loss(fn):
            return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2)))

        diff = float(jnp.max(jnp.abs(jax.jit(plain)(q, k, v).astype(jnp.float32)
                                     - jax.jit(library)(q, k, v).astype(jnp.float32))))
        t_plain, t_lib = _time(loss(plain), q, k, v, reps=reps), _time(loss(library), q, k, v, reps=reps)
        print(f"{label:<18} {t_plain * 1e3:>9.2f} {t_lib * 1e3:>9.2f} {t_plain / t_lib:>11.2f}x {diff:>10.2e}",
              flush=True)


if __name__ == "__main__":
    main()
