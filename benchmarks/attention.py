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

from mixtral_jax.models.attention import attention_mask, dot_product_attention, library_attention


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
    print(f"device {jax.devices()[0].device_kind}; b {b}, seq {t}, heads {h}/{kv}, head_dim {d}, {jnp.dtype(dtype).name}")
    # two packed documents per row: the model passes the document mask on every call
    segments = jnp.broadcast_to((jnp.arange(t) >= t // 3).astype(jnp.int32) + 1, (b, t))
    positions = jnp.where(segments == 1, jnp.arange(t), jnp.arange(t) - t // 3)
    impl = "cudnn" if gpu and dtype != jnp.float32 else None
    print(f"jax.nn kernel: {impl or 'xla'}")
    print(f"{'mask':<18} {'plain ms':>9} {'+doc mask':>10} {'no doc mask':>11} {'plain/+doc':>10} {'max |diff|':>10}")
    for label, window in (("causal", None), (f"window {t // 4}", t // 4)):
        mask = attention_mask(positions, positions, segments, segments, window)
        local = None if window is None else (window - 1, 0)

        def plain(q, k, v):
            return dot_product_attention(q, k, v, mask)

        def library(q, k, v):  # what the model runs (attention_impl: dot_product)
            return library_attention(q, k, v, positions, segments, window)

        def library_unpacked(q, k, v):  # the kernel alone, without the document mask (as a bias on cuDNN)
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation=impl)

        def loss(fn):
            return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2)))

        diff = float(jnp.max(jnp.abs(jax.jit(plain)(q, k, v).astype(jnp.float32)
                                     - jax.jit(library)(q, k, v).astype(jnp.float32))))
        times = [_time(loss(fn), q, k, v, reps=reps) for fn in (plain, library, library_unpacked)]
        print(f"{label:<18} {times[0] * 1e3:>9.2f} {times[1] * 1e3:>10.2f} {times[2] * 1e3:>11.2f} "
              f"{times[0] / times[1]:>9.2f}x {diff:>10.2e}", flush=True)


if __name__ == "__main__":
    main()
