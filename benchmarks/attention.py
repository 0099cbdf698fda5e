"""Attention kernels, forward + backward, on rows of packed documents: the model's plain jnp
attention (scores materialised, float32 softmax) against `jax.nn.dot_product_attention` (cuDNN
flash attention on NVIDIA GPUs, XLA elsewhere) with the documents as a mask, and on cuDNN against
its segment layout (kernels/packed_attention.py), causal and with a Mistral sliding window. Each
kernel's output and gradients are checked against the plain attention in float32; times are
ratios measured in one run.

    python -m benchmarks.attention          # accelerator: bf16, seq 2048, 16 heads (GQA 16:8), dim 128
    python -m benchmarks.attention --smoke  # anywhere, small shapes
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.kernels import packed_attention as packed
from mixtral_jax.models.attention import attention_mask, dot_product_attention, library_attention


def _time(fn, *args, reps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / reps


def packed_rows(b: int, t: int) -> tuple[np.ndarray, np.ndarray]:
    """segment_ids and positions [b, t] for rows of 1 to 6 documents of unequal lengths, one row
    ending in padding (segment 0), as the packer writes them."""
    splits = [[0.34, 0.49, 0.93], [], [0.05, 0.1, 0.15, 0.2, 0.25], [0.5, 0.99]]
    segments = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    for row in range(b):
        cuts = [0, *(int(f * t) for f in splits[row % len(splits)]), t]
        for doc, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
            segments[row, lo:hi] = doc + 1
            positions[row, lo:hi] = np.arange(hi - lo)
        if row % len(splits) == 3:
            segments[row, cuts[-2]:] = 0
    return segments, positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    b, t, h, kv, d = (4, 128, 4, 2, 32) if args.smoke else (4, 2048, 16, 8, 128)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    reps = args.reps or (2 if args.smoke else 20)
    gpu = jax.devices()[0].platform == "gpu"
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, n, d)), dtype) for n in (h, kv, kv))
    cotangent = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    segments, positions = (jnp.asarray(a) for a in packed_rows(b, t))
    cudnn = gpu and dtype != jnp.float32
    print(f"device {jax.devices()[0].device_kind}; b {b}, seq {t}, heads {h}/{kv}, head_dim {d}, "
          f"{jnp.dtype(dtype).name}; segments per row {[len(set(r)) for r in segments.tolist()]}; "
          f"jax.nn kernel: {'cudnn' if cudnn else 'xla'}")
    print(f"{'mask':<12} {'kernel':<30} {'ms':>8} {'vs mask':>8} {'out err':>8} {'grad err':>8}")
    for label, window in (("causal", None), (f"window {t // 4}", t // 4)):
        mask = attention_mask(positions, positions, segments, segments, window)
        local = None if window is None else (window - 1, 0)

        library = "cudnn" if cudnn else "xla"

        def model_path(q, k, v):  # what the model runs (attention_impl: dot_product)
            return library_attention(q, k, v, positions, segments, window, library, packed.SEGMENT_BOUNDS)

        def masked(q, k, v):  # the same with the documents as a mask (cuDNN: a bias)
            return library_attention(q, k, v, positions, segments, window, library, ())

        kernels = {"plain (ours)": lambda q, k, v: dot_product_attention(q, k, v, mask), "library, document mask": masked}
        if cudnn and packed.supported():
            kernels[f"model: segments {packed.SEGMENT_BOUNDS}"] = model_path
            for m in (8, 32):
                lengths, offsets, _ = packed.segment_layout(segments, m)
                kernels[f"cuDNN segments M={m}, no cond"] = (
                    lambda q, k, v, lengths=lengths, offsets=offsets: packed.packed_attention(q, k, v, lengths, offsets,
                                                                                             window))
            kernels["segments (4,): falls back"] = lambda q, k, v: packed.packed_or_masked(q, k, v, segments, window,
                                                                                           masked, (4,))
        if cudnn:
            kernels["cuDNN, no document mask"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=local, implementation="cudnn")

        def loss(fn):  # the cotangent is an argument: as a captured constant XLA spends seconds folding it
            return lambda q, k, v, ct: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)

        upcast = [x.astype(jnp.float32) for x in (q, k, v)]
        ref_out = dot_product_attention(*upcast, mask)
        ref_grads = jax.grad(loss(kernels["plain (ours)"]), argnums=(0, 1, 2))(*upcast, cotangent)
        base = None
        for name, fn in kernels.items():
            try:
                step = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))
                seconds = _time(step, q, k, v, cotangent, reps=reps)
                out_err = float(jnp.max(jnp.abs(jax.jit(fn)(q, k, v).astype(jnp.float32) - ref_out)) /
                                jnp.max(jnp.abs(ref_out)))
                grad_err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
                               for g, r in zip(step(q, k, v, cotangent), ref_grads))
            except Exception as exc:  # noqa: BLE001 - a kernel the card lacks is reported, not fatal
                print(f"{label:<12} {name:<30} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            base = base if name != "library, document mask" else seconds
            ratio = f"{seconds / base:.2f}x" if base else ""
            exact = "" if name != "cuDNN, no document mask" else " (other function)"
            print(f"{label:<12} {name:<30} {seconds * 1e3:>8.2f} {ratio:>8} {out_err:>8.1e} {grad_err:>8.1e}{exact}",
                  flush=True)


if __name__ == "__main__":
    main()
