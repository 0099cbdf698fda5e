"""Grouped-query self-attention with RoPE, optional sliding window and packed-document masking,
plus a KV-cached path for generation (a rolling buffer of W slots under a sliding window)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.config.choices import ATTENTION_IMPLS, QK_NORMS
from mixtral_jax.kernels import packed_attention as packed
from mixtral_jax.kernels.backend import Kernels
from mixtral_jax.models.layers import INIT_STD, RMSNorm, apply_rope, as_dtype, make_param

# Large finite negative rather than -inf: a fully masked row then gives a uniform softmax
# instead of NaNs (cannot happen with causal masks, since a token always sees itself).
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One layer's keys / values for generation (the Transformer stacks a leading layers axis).

    k, v [B, S, KV, Dh] (RoPE already applied to k) and pos [B, S] int32, the absolute position
    held in each slot, -1 for an empty one. The token at position p lives in slot p % S: with a
    sliding window W and S = W this is Mistral's rolling buffer, since a query never needs a key
    more than W - 1 positions back, the slot it would overwrite is always already out of reach.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array

    @classmethod
    def empty(cls, batch: int, slots: int, n_kv_heads: int, head_dim: int, dtype: jnp.dtype) -> "KVCache":
        shape = (batch, slots, n_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, slots), -1, jnp.int32))


def attention_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    q_seg: jax.Array,
    k_seg: jax.Array,
    window: int | None,
) -> jax.Array:
    """Boolean [B, Tq, Tk]: True where query i may attend to key j.

    causal (k_pos <= q_pos) AND same segment AND, with a sliding window W, q_pos - k_pos < W
    (a query sees at most W positions including itself, the Mistral / HF convention).
    Positions restart at 0 for every packed document, so they double as within-document order.
    """
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    mask = (diff >= 0) & (q_seg[:, :, None] == k_seg[:, None, :])
    if window is not None:
        mask &= diff < window
    return mask


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,T,H,D], k/v [B,S,KV,D] with H a multiple of KV, mask [B,T,S] -> [B,T,H,D].

    Query head h reads kv head h // G, G = H // KV, matching HF's `repeat_kv`. The G query heads
    sharing a kv head are folded into the rows of one [T G, D] x [D, S] product per batch row and
    kv head (row r is position r // G). These are plain batched matmuls, and XLA:CPU copies no
    score-sized array into another layout: the benchmark's train step 0.978x (dense) and 0.993x
    (MoE) against the same math with the heads as a separate axis (XLA's composition). Scores and
    softmax are float32; the value product runs in v's dtype.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    rows = q.reshape(b, t, kv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, d)
    scores = jnp.einsum("bkrd,bskd->bkrs", rows, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(jnp.repeat(mask, g, axis=1)[:, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkrs,bskd->bkrd", probs, v)
    return out.reshape(b, kv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def library_implementation(q: jax.Array, kernels: Kernels) -> str | None:
    """Which library kernel `jax.nn.dot_product_attention` should run for q; None where there is
    none, and the model then runs `dot_product_attention`.

    jax's default is XLA's composition on every backend, which materialises the scores like our
    path, in a layout XLA:CPU runs slower; cuDNN's flash kernel must be asked for by name. It
    takes 16-bit inputs with a head dim that is a multiple of 8 up to 128 (the sizes it supports
    on every NVIDIA architecture), so float32 runs and other head dims stay on ours."""
    if kernels.attention_library != "cudnn":
        return kernels.attention_library
    head_dim = q.shape[-1]
    if q.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return None


def library_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                      window: int | None, implementation: str, segment_bounds: tuple[int, ...] = ()) -> jax.Array:
    """The same attention through `jax.nn.dot_product_attention` with the kernel `implementation`
    ("cudnn", or "xla" for XLA's composition): causality and the window as the kernel's own
    is_causal / local_window_size (what cuDNN's flash kernel skips blocks by), packed documents as
    a boolean mask (cuDNN adds it as a bias), or with cuDNN and `segment_bounds` (Hopper on), as
    its segment layout (`packed_attention`). Row index order equals position order within a
    document, so this is the mask `attention_mask` builds from positions."""
    window_size = None if window is None else (window - 1, 0)

    def masked(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=same_doc[:, None], is_causal=True,
                                            local_window_size=window_size, implementation=implementation)

    if implementation == "cudnn" and segment_bounds:
        return packed.packed_or_masked(q, k, v, segment_ids, window, masked, segment_bounds)
    return masked(q, k, v)


@ATTENTION_IMPLS.register("plain")
def plain_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                    window: int | None, kernels: Kernels) -> jax.Array:
    """Our einsum attention over the mask of positions, documents and window."""
    return dot_product_attention(q, k, v, attention_mask(positions, positions, segment_ids, segment_ids, window))


@ATTENTION_IMPLS.register("dot_product")
def library_or_plain_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                               segment_ids: jax.Array, window: int | None, kernels: Kernels) -> jax.Array:
    """The library kernel where `library_implementation` names one, else `plain_attention`."""
    implementation = library_implementation(q, kernels)
    if implementation is None:
        return plain_attention(q, k, v, positions, segment_ids, window, kernels)
    return library_attention(q, k, v, positions, segment_ids, window, implementation, kernels.segment_bounds)


class QKNorm(nnx.Module):
    """RMSNorm of queries or keys [B, T, heads, Dh] before RoPE: over each head's Dh features
    with one weight [Dh] shared by the heads (`head`: Qwen3, Dots1), or over the whole
    projection, weight [heads * Dh] (`full`: OLMoE)."""

    def __init__(self, heads: int, head_dim: int, eps: float, per_head: bool, param_dtype: jnp.dtype):
        self.per_head = per_head
        self.norm = RMSNorm(head_dim if per_head else heads * head_dim, eps, param_dtype=param_dtype,
                            axis="head_dim" if per_head else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.per_head:
            return self.norm(x)
        return self.norm(x.reshape(*x.shape[:2], -1)).reshape(x.shape)


QK_NORMS.register("none", None)
QK_NORMS.register("head", True)
QK_NORMS.register("full", False)


class Attention(nnx.Module):
    """GQA self-attention. Weights: wq [dim, H, Dh], wk/wv [dim, KV, Dh], wo [H, Dh, dim]; with
    model.qkv_bias also bq [H, Dh], bk / bv [KV, Dh]; with model.qk_norm, q_norm and k_norm."""

    def __init__(self, cfg: ModelConfig, *, kernels: Kernels | None = None, rngs: nnx.Rngs):
        self.kernels = kernels or Kernels.for_backend()
        self.attend = ATTENTION_IMPLS.get(cfg.attention_impl)
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.rope_theta = cfg.rope_theta
        self.window = cfg.sliding_window
        self.dtype = as_dtype(cfg.dtype)
        pdt = as_dtype(cfg.param_dtype)
        out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)  # residual-branch scaling (GPT-2)
        d, hd = cfg.dim, self.head_dim
        self.wq = make_param(rngs, (d, cfg.n_heads, hd), ("embed", "q_heads", "head_dim"), pdt)
        self.wk = make_param(rngs, (d, cfg.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.wv = make_param(rngs, (d, cfg.n_kv_heads, hd), ("embed", "kv_heads", "head_dim"), pdt)
        self.wo = make_param(rngs, (cfg.n_heads, hd, d), ("q_heads", "head_dim", "embed"), pdt, out_std)
        if cfg.qkv_bias:
            self.bq = make_param(rngs, (cfg.n_heads, hd), ("q_heads", "head_dim"), pdt, std=0.0)
            self.bk = make_param(rngs, (cfg.n_kv_heads, hd), ("kv_heads", "head_dim"), pdt, std=0.0)
            self.bv = make_param(rngs, (cfg.n_kv_heads, hd), ("kv_heads", "head_dim"), pdt, std=0.0)
        else:
            self.bq = self.bk = self.bv = None
        per_head = QK_NORMS.get(cfg.qk_norm)
        if per_head is None:
            self.q_norm = self.k_norm = None
        else:
            self.q_norm = QKNorm(cfg.n_heads, hd, cfg.norm_eps, per_head, pdt)
            self.k_norm = QKNorm(cfg.n_kv_heads, hd, cfg.norm_eps, per_head, pdt)

    def _project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B,T,H,Dh], k / v [B,T,KV,Dh] in the compute dtype, q and k rotated at `positions`."""
        dt = self.dtype
        b, t, d = x.shape
        rows = x.reshape(b * t, d).astype(dt)  # 2-D matmuls: the CPU compiler's fastest form

        def project(w: nnx.Param, bias: nnx.Param | None) -> jax.Array:
            _, heads, head_dim = w.shape
            out = self.kernels.matmul(rows, w[...].astype(dt).reshape(d, heads * head_dim)).reshape(
                b, t, heads, head_dim)
            return out if bias is None else out + bias[...].astype(dt)

        q, k, v = project(self.wq, self.bq), project(self.wk, self.bk), project(self.wv, self.bv)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, positions, self.rope_theta), apply_rope(k, positions, self.rope_theta), v

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x [B, T, dim], positions / segment_ids [B, T] int -> [B, T, dim] in the compute dtype."""
        q, k, v = self._project(x, positions)
        return self._output(self.attend(q, k, v, positions, segment_ids, self.window, self.kernels))

    def _output(self, out: jax.Array) -> jax.Array:
        """[B, T, H, Dh] -> [B, T, dim] through wo, as one 2-D matmul."""
        b, t, h, hd = out.shape
        wo = self.wo[...].astype(self.dtype).reshape(h * hd, -1)
        return self.kernels.matmul(out.astype(self.dtype).reshape(b * t, h * hd), wo).reshape(b, t, -1)

    def decode(self, x: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """A chunk of new tokens x [B, T, dim] at absolute positions [B, T] (increasing, after every
        position already cached) -> (out [B, T, dim], the cache with the chunk written in).

        The chunk attends to the cache contents and to itself, so the same code serves a prefill
        longer than the cache and a one-token decode step. The chunk is written after attending
        because, when T > 1, its own earlier tokens may need slots the chunk's later tokens evict.
        """
        q, k, v = self._project(x, positions)
        keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
        values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
        k_pos = jnp.concatenate([cache.pos, positions.astype(jnp.int32)], axis=1)
        # Empty slots get segment 0 and every query segment 1: the packed-document rule then
        # masks them, and causality plus the window handle the rest by absolute position.
        q_seg = jnp.ones_like(positions, jnp.int32)
        k_seg = (k_pos >= 0).astype(jnp.int32)
        mask = attention_mask(positions, k_pos, q_seg, k_seg, self.window)
        out = dot_product_attention(q.astype(keys.dtype), keys, values, mask)
        return self._output(out), write_cache(cache, k, v, positions)


def write_cache(cache: KVCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> KVCache:
    """Store a chunk's k / v [B, T, KV, Dh] at slots positions % S. Only the last S tokens are
    kept when T > S: earlier ones would be overwritten within this same write anyway, and a
    scatter with duplicate indices has no defined winner."""
    slots = cache.pos.shape[1]
    if k.shape[1] > slots:
        k, v, positions = k[:, -slots:], v[:, -slots:], positions[:, -slots:]
    positions = positions.astype(jnp.int32)
    rows = jnp.arange(k.shape[0])[:, None]
    slot = positions % slots
    return KVCache(
        k=cache.k.at[rows, slot].set(k.astype(cache.k.dtype)),
        v=cache.v.at[rows, slot].set(v.astype(cache.v.dtype)),
        pos=cache.pos.at[rows, slot].set(positions),
    )
