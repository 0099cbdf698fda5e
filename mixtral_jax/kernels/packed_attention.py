"""Packed documents as cuDNN's segment layout instead of a mask.

`jax.nn.dot_product_attention` takes the packed-document rule as a boolean mask, which cuDNN's
flash kernel reads as an additive [B, 1, T, T] bias: ~8% of the dense GPU step on an H100
(benchmarks/attention.py). cuDNN can instead take each row's documents as segments, given by
their lengths and start offsets (its "ragged" layout), and then runs each document as its own
causal sequence. jax exposes that only in its cuDNN module (`q_offsets` / `kv_offsets`), so this
file is the one place that touches that private API.

The layout has a static bound on segments per row. The model's `Kernels.segment_bounds`
(default SEGMENT_BOUNDS on Hopper) are tried in order (`lax.cond`
on the batch: the first bound every row fits runs), and a batch with a row over the last one takes
the mask path, so the result never depends on the bounds. The smaller bound is the faster kernel
(cuDNN launches work for every possible segment): forward + backward of one layer on an H200,
batch 4, seq 2048, rows of 1 to 6 documents: 0.59 ms at M = 8, 0.91 ms at M = 32, 1.25 ms with
the mask. Padding (segment id 0) is one more segment; its outputs may differ from the mask path's,
since the packer gives every padding token position 0, and the loss never reads them.

The layout needs Hopper or later (compute capability 9.0); `supported` says whether this device
and jax version have it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

# The default segments-per-row bounds, tried in order (`Kernels.segment_bounds`; () keeps the
# document mask as a bias everywhere).
SEGMENT_BOUNDS: tuple[int, ...] = (8, 32)


def supported() -> bool:
    """True on an NVIDIA GPU of compute capability >= 9.0 with jax's cuDNN attention module."""
    device = jax.devices()[0]
    if device.platform != "gpu" or not hasattr(device, "compute_capability"):
        return False
    if importlib.util.find_spec("jax._src.cudnn.fused_attention_stablehlo") is None:  # private: may move
        return False
    major = int(str(device.compute_capability).split(".")[0])
    return major >= 9


def segment_layout(segment_ids: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """segment_ids [B, T] (equal ids contiguous, as the packer writes them; padding is one more
    segment, so every token is in one) -> (lengths [B, M], offsets [B, M + 1], fits []).

    lengths[b, j] and offsets[b, j] are the length and start of row b's j-th segment, -1 past its
    last one (and in offsets' final column), the convention of jax's cuDNN wrapper. fits is True
    when no row has more than M segments; otherwise lengths and offsets are incomplete."""
    b, t = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    ordinal = jnp.cumsum(starts, axis=1, dtype=jnp.int32) - 1  # each token's segment number in its row
    count = ordinal[:, -1] + 1
    lengths = jnp.zeros((b, max_segments), jnp.int32).at[jnp.arange(b)[:, None], ordinal].add(1, mode="drop")
    begins = jnp.cumsum(lengths, axis=1) - lengths
    used = jnp.arange(max_segments)[None, :] < count[:, None]
    offsets = jnp.concatenate([jnp.where(used, begins, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return jnp.where(used, lengths, -1), offsets, jnp.all(count <= max_segments)


def packed_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, offsets: jax.Array,
                     window: int | None) -> jax.Array:
    """cuDNN flash attention, causal within each segment of `segment_layout`, optionally within a
    window of `window` positions including the query's own. q [B,T,H,D], k/v [B,T,KV,D], 16-bit."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    return cudnn_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
                           scale=1.0 / math.sqrt(q.shape[-1]), mask_type=MaskType.PADDING_CAUSAL,
                           sliding_window_length=window)


def packed_or_masked(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, window: int | None,
                     masked: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                     bounds: Sequence[int]) -> jax.Array:
    """cuDNN's segment layout at the first of `bounds` that every row fits, else
    masked(q, k, v): the same attention with the documents as a mask."""
    bounds = tuple(bounds)
    if not bounds:
        return masked(q, k, v)
    lengths, offsets, fits = segment_layout(segment_ids, bounds[0])
    return jax.lax.cond(fits, lambda q, k, v: packed_attention(q, k, v, lengths, offsets, window),
                        lambda q, k, v: packed_or_masked(q, k, v, segment_ids, window, masked, bounds[1:]), q, k, v)
