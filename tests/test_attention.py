"""RoPE, the attention mask and GQA attention against plain numpy loop references."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mixtral_jax.config import load_config
from mixtral_jax.kernels.backend import Kernels
from mixtral_jax.models.attention import Attention, attention_mask
from mixtral_jax.models.layers import RMSNorm, apply_rope


def np_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Loop form of the formula: dims i and i + D/2 rotate by angle pos * theta^(-2i/D)."""
    b, t, h, d = x.shape
    half = d // 2
    out = np.empty_like(x, dtype=np.float64)
    for bi in range(b):
        for ti in range(t):
            for i in range(half):
                angle = positions[bi, ti] * theta ** (-2.0 * i / d)
                c, s = np.cos(angle), np.sin(angle)
                x1, x2 = x[bi, ti, :, i], x[bi, ti, :, i + half]
                out[bi, ti, :, i] = x1 * c - x2 * s
                out[bi, ti, :, i + half] = x2 * c + x1 * s
    return out


def np_allowed(pos, seg, i, j, window) -> bool:
    ok = seg[i] == seg[j] and pos[j] <= pos[i]
    return ok and (window is None or pos[i] - pos[j] < window)


def np_attention(x, wq, wk, wv, wo, positions, segments, theta, window) -> np.ndarray:
    """Per-batch, per-head loop; kv head of query head h is h // (H // KV) (HF repeat_kv)."""
    b, t, _ = x.shape
    n_heads, n_kv = wq.shape[1], wk.shape[1]
    out = np.zeros((b, t, n_heads, wq.shape[2]))
    for bi in range(b):
        for h in range(n_heads):
            g = h // (n_heads // n_kv)
            q = np_rope((x[bi] @ wq[:, h, :])[None, :, None, :], positions[bi : bi + 1], theta)[0, :, 0]
            k = np_rope((x[bi] @ wk[:, g, :])[None, :, None, :], positions[bi : bi + 1], theta)[0, :, 0]
            v = x[bi] @ wv[:, g, :]
            for i in range(t):
                allowed = [j for j in range(t) if np_allowed(positions[bi], segments[bi], i, j, window)]
                s = np.array([q[i] @ k[j] for j in allowed]) / np.sqrt(q.shape[-1])
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, i, h] = sum(pj * v[j] for pj, j in zip(p, allowed))
    return np.einsum("bthk,hkd->btd", out, wo)


def tiny_cfg(**model):
    overrides = [f"model.{k}={'null' if v is None else v}" for k, v in model.items()]
    return load_config("configs/model/tiny_dense.yaml", overrides).model


def weights_of(attn: Attention):
    return [np.asarray(w[...], np.float64) for w in (attn.wq, attn.wk, attn.wv, attn.wo)]


def packed_inputs():
    """Batch 0: two packed documents (positions restart); batch 1: one document."""
    seg = np.array([[1] * 5 + [2] * 7, [1] * 12])
    pos = np.array([list(range(5)) + list(range(7)), list(range(12))])
    return pos, seg


def test_rope_matches_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 3, 0, 100, 2000]])
    got = apply_rope(jnp.asarray(x), jnp.asarray(positions), 10000.0)
    np.testing.assert_allclose(np.asarray(got), np_rope(x, positions, 10000.0), rtol=1e-4, atol=1e-4)


def test_rope_preserves_norm_and_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)
    rot = lambda v, p: np.asarray(apply_rope(jnp.asarray(v), jnp.array([[p]]), 1e4))[0, 0, 0]
    np.testing.assert_allclose(np.linalg.norm(rot(q, 37)), np.linalg.norm(q[0, 0, 0]), rtol=1e-5)
    # q.k depends only on the offset between positions
    np.testing.assert_allclose(rot(q, 10) @ rot(k, 7), rot(q, 103) @ rot(k, 100), rtol=1e-4)


def test_window_keeps_exactly_w_positions_including_self():
    t, w = 10, 3
    pos = jnp.arange(t)[None]
    seg = jnp.ones((1, t), jnp.int32)
    mask = np.asarray(attention_mask(pos, pos, seg, seg, w))[0]
    for i in range(t):
        assert mask[i].sum() == min(i + 1, w)
        assert list(np.nonzero(mask[i])[0]) == list(range(max(0, i - w + 1), i + 1))
    full = np.asarray(attention_mask(pos, pos, seg, seg, None))[0]
    np.testing.assert_array_equal(full, np.tril(np.ones((t, t), bool)))


def test_mask_blocks_attention_across_segments():
    pos, seg = (jnp.asarray(a) for a in packed_inputs())
    mask = np.asarray(attention_mask(pos, pos, seg, seg, None))
    seg = np.asarray(seg)
    cross = seg[:, :, None] != seg[:, None, :]
    assert not mask[cross].any()
    # the first token of document 2 sees only itself
    assert mask[0, 5].sum() == 1 and mask[0, 5, 5]


@pytest.mark.parametrize("impl,kernel", [("plain", None), ("dot_product", None), ("dot_product", "xla")])
@pytest.mark.parametrize("window", [None, 3])
def test_gqa_matches_numpy_loop(window, impl, kernel):
    """Both implementations against the loop, on packed documents: ours, and
    jax.nn.dot_product_attention with the window as local_window_size. On CPU dot_product has no
    library kernel and runs ours, so the library call is also forced (kernel "xla", XLA's
    composition) to check the arguments it gets on GPUs."""
    kernels = Kernels.for_backend("cpu").replace(attention_library=kernel)
    cfg = tiny_cfg(dim=16, n_heads=4, n_kv_heads=2, head_dim=6, sliding_window=window, attention_impl=impl)
    attn = Attention(cfg, kernels=kernels, rngs=nnx.Rngs(0))
    x = np.random.default_rng(2).normal(size=(2, 12, 16)).astype(np.float32)
    pos, seg = packed_inputs()
    got = attn(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(seg))
    want = np_attention(x.astype(np.float64), *weights_of(attn), pos, seg, cfg.rope_theta, window)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def np_mha(x, wq, wk, wv, wo, theta):
    """Textbook causal multi-head attention, all heads at once."""
    t = x.shape[1]
    pos = np.arange(t)[None]
    q = np_rope(np.einsum("btd,dhk->bthk", x, wq), pos, theta)
    k = np_rope(np.einsum("btd,dhk->bthk", x, wk), pos, theta)
    v = np.einsum("btd,dhk->bthk", x, wv)
    s = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshk,hkd->btd", p, v, wo)


def test_gqa_with_all_kv_heads_is_mha():
    cfg = tiny_cfg(dim=16, n_heads=4, n_kv_heads=4, head_dim=4, sliding_window=None)
    attn = Attention(cfg, rngs=nnx.Rngs(1))
    x = np.random.default_rng(3).normal(size=(1, 9, 16)).astype(np.float32)
    pos, seg = jnp.arange(9)[None], jnp.ones((1, 9), jnp.int32)
    got = attn(jnp.asarray(x), pos, seg)
    want = np_mha(x.astype(np.float64), *weights_of(attn), cfg.rope_theta)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Grouping convention: query head h shares kv head h // group (like HF repeat_kv)."""
    gqa = Attention(tiny_cfg(dim=16, n_heads=4, n_kv_heads=2, head_dim=4, sliding_window=None), rngs=nnx.Rngs(2))
    mha = Attention(tiny_cfg(dim=16, n_heads=4, n_kv_heads=4, head_dim=4, sliding_window=None), rngs=nnx.Rngs(3))
    mha.wq[...] = gqa.wq[...]
    mha.wo[...] = gqa.wo[...]
    mha.wk[...] = jnp.repeat(gqa.wk[...], 2, axis=1)
    mha.wv[...] = jnp.repeat(gqa.wv[...], 2, axis=1)
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    pos, seg = jnp.broadcast_to(jnp.arange(7), (2, 7)), jnp.ones((2, 7), jnp.int32)
    np.testing.assert_allclose(np.asarray(gqa(x, pos, seg)), np.asarray(mha(x, pos, seg)), rtol=1e-5, atol=1e-6)


def test_rmsnorm_matches_formula_and_keeps_dtype():
    x = np.random.default_rng(4).normal(size=(3, 8)).astype(np.float32)
    norm = RMSNorm(8, eps=1e-5)
    norm.weight[...] = jnp.arange(1.0, 9.0)
    want = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * np.arange(1.0, 9.0)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5)
    assert norm(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16
