"""Grouped-query self-attention with RoPE, optional sliding window and packed-document masking."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.models.layers import INIT_STD, apply_rope, as_dtype, make_param

# Large finite negative rather than -inf: a fully masked row then gives a uniform softmax
# instead of NaNs (cannot happen with causal masks, since a token always sees itself).
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def head_dim_of(cfg: ModelConfig) -> int:
    """cfg.head_dim, or dim // n_heads when the config leaves it null."""
    return cfg.head_dim if cfg.head_dim is not None else cfg.dim // cfg.n_heads


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

    Query head h reads kv head h // (H // KV), matching HF's `repeat_kv`. Scores and softmax
    are float32; the value product runs in v's dtype.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)  # group query heads by the kv head they share
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(d)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


class Attention(nnx.Module):
    """GQA self-attention. Weights: wq [dim, H, Dh], wk/wv [dim, KV, Dh], wo [H, Dh, dim]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = head_dim_of(cfg)
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

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x [B, T, dim], positions / segment_ids [B, T] int -> [B, T, dim] in the compute dtype."""
        dt = self.dtype
        x = x.astype(dt)
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt))
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dt))
        q = apply_rope(q, positions, self.rope_theta)
        k = apply_rope(k, positions, self.rope_theta)
        mask = attention_mask(positions, positions, segment_ids, segment_ids, self.window)
        out = dot_product_attention(q, k, v, mask)
        return jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dt))
