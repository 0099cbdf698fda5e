"""MoE block, dispatchers and routing losses against per-token numpy loops and hand values."""

import math

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mixtral_jax.config import load_config
from mixtral_jax.models.dispatch import DISPATCHERS, dense, dropless
from mixtral_jax.models.moe import STAT_KEYS, MoEBlock
from mixtral_jax.models.routing import (
    ROUTERS,
    load_balancing_loss,
    router_stats,
    router_z_loss,
    topk_softmax,
)

DIM, HIDDEN, E = 8, 12, 4


def moe_cfg(dispatch="dropless", top_k=2, **model):
    overrides = [f"model.dim={DIM}", f"model.hidden_dim={HIDDEN}", f"model.moe.num_experts={E}",
                 f"model.moe.top_k={top_k}", f"model.moe.dispatch={dispatch}"]
    overrides += [f"model.{k}={v}" for k, v in model.items()]
    return load_config("configs/model/tiny_moe.yaml", overrides).model


def np_moe(x, router, w_gate, w_up, w_down, k):
    """Per token: top-k router logits, softmax over them, weighted sum of the chosen experts."""
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        logits = x[n] @ router
        top = np.argsort(-logits)[:k]
        w = np.exp(logits[top] - logits[top].max())
        w /= w.sum()
        for wj, e in zip(w, top):
            gate, up = x[n] @ w_gate[e], x[n] @ w_up[e]
            out[n] += wj * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    return out


def block_weights(block: MoEBlock):
    return [np.asarray(p[...], np.float64) for p in (block.router, block.w_gate, block.w_up, block.w_down)]


@pytest.mark.parametrize("dispatch", ["dropless", "dense"])
def test_moe_block_matches_numpy_loop(dispatch):
    block = MoEBlock(moe_cfg(dispatch), rngs=nnx.Rngs(0))
    block.router[...] = jax.random.normal(jax.random.key(1), (DIM, E))  # decisive routing
    x = np.random.default_rng(0).normal(size=(2, 5, DIM)).astype(np.float32)
    y, stats = block(jnp.asarray(x))
    want = np_moe(x.reshape(10, DIM).astype(np.float64), *block_weights(block), k=2).reshape(2, 5, DIM)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-6)
    assert set(stats) == set(STAT_KEYS)
    assert stats["expert_load"].shape == (E,) and float(stats["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(float(stats["expert_load"].sum()), 1.0, rtol=1e-6)


def _forced_block(dispatch, top_k, *, favour=None, avoid=None):
    """A block whose router, given inputs with a large constant feature 0, always picks
    expert `favour` first and never picks expert `avoid`."""
    block = MoEBlock(moe_cfg(dispatch, top_k), rngs=nnx.Rngs(0))
    router = 0.1 * jax.random.normal(jax.random.key(2), (DIM, E))
    if favour is not None:
        router = router.at[0, favour].set(50.0)
    if avoid is not None:
        router = router.at[0, avoid].set(-50.0)
    block.router[...] = router
    return block


def _inputs(n=12):
    x = jax.random.normal(jax.random.key(3), (1, n, DIM))
    return x.at[..., 0].set(3.0)


@pytest.mark.parametrize("case", ["random", "empty_expert", "one_expert"])
def test_dropless_equals_dense_outputs_and_gradients(case):
    forcing = {"random": dict(top_k=2), "empty_expert": dict(top_k=2, avoid=0),
               "one_expert": dict(top_k=1, favour=2)}[case]
    top_k = forcing.pop("top_k")
    results = {}
    for dispatch in ("dropless", "dense"):
        block = _forced_block(dispatch, top_k, **forcing) if forcing else MoEBlock(
            moe_cfg(dispatch, top_k), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(block)

        def loss(params, x):
            y, _ = nnx.merge(graphdef, params)(x)
            return jnp.sum(jnp.sin(y))  # non-trivial cotangent per output element

        x = _inputs()
        results[dispatch] = (nnx.merge(graphdef, params)(x), jax.grad(loss, argnums=(0, 1))(params, x))

    (y_a, stats_a), (gp_a, gx_a) = results["dropless"]
    (y_b, _), (gp_b, gx_b) = results["dense"]
    load = np.asarray(stats_a["expert_load"])
    if case == "empty_expert":
        assert load[0] == 0.0
    if case == "one_expert":
        np.testing.assert_array_equal(load, np.eye(E)[2])
    np.testing.assert_allclose(np.asarray(y_a), np.asarray(y_b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gx_a), np.asarray(gx_b), rtol=1e-4, atol=1e-6)
    for name in ("w_gate", "w_up", "w_down", "router"):
        np.testing.assert_allclose(np.asarray(gp_a[name][...]), np.asarray(gp_b[name][...]), rtol=1e-4, atol=1e-6)
    if case == "empty_expert":  # an expert with no tokens gets exactly zero gradient
        assert not np.any(np.asarray(gp_a["w_gate"][...])[0])


def test_dispatchers_under_jit_with_all_slots_on_one_expert():
    """Direct call: every token's both slots on expert 1 (group sizes [0, 2N, 0, 0])."""
    n = 6
    x = jax.random.normal(jax.random.key(0), (n, DIM))
    keys = jax.random.split(jax.random.key(1), 3)
    wg, wu = (jax.random.normal(k, (E, DIM, HIDDEN)) for k in keys[:2])
    wd = jax.random.normal(keys[2], (E, HIDDEN, DIM))
    ids = jnp.ones((n, 2), jnp.int32)
    w = jnp.full((n, 2), 0.5)
    a = jax.jit(dropless)(x, w, ids, wg, wu, wd)
    b = jax.jit(dense)(x, w, ids, wg, wu, wd)
    gate, up = x @ wg[1], x @ wu[1]
    np.testing.assert_allclose(np.asarray(a), np.asarray((jax.nn.silu(gate) * up) @ wd[1]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_topk_softmax_hand_values():
    weights, ids = topk_softmax(jnp.array([[1.0, 3.0, 2.0, 0.0]]), 2)
    np.testing.assert_array_equal(np.asarray(ids), [[1, 2]])
    np.testing.assert_allclose(np.asarray(weights), [[math.e / (math.e + 1), 1 / (math.e + 1)]], rtol=1e-6)
    assert ROUTERS["topk_softmax"] is topk_softmax and set(DISPATCHERS) >= {"dropless", "dense"}


@pytest.mark.parametrize("k", [1, 2])
def test_switch_loss_is_one_at_perfect_balance(k):
    # token i strongly prefers expert i, then i+1: every expert gets the same number of slots,
    # and by symmetry the mean softmax probability is uniform.
    logits = jnp.array([[4.0 if e == i else (2.0 if e == (i + 1) % 4 else 0.0) for e in range(4)] for i in range(4)])
    weights, ids = topk_softmax(logits, k)
    loss = load_balancing_loss(jax.nn.softmax(logits), ids, 4)
    np.testing.assert_allclose(float(loss), 1.0, rtol=1e-6)


def test_switch_loss_unbalanced_hand_value():
    # both tokens: probs [3/4, 1/4], top-1 = expert 0 -> f = [1, 0], P = [3/4, 1/4];
    # loss = E * sum f*P = 2 * 3/4 = 1.5
    logits = jnp.array([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    _, ids = topk_softmax(logits, 1)
    np.testing.assert_allclose(float(load_balancing_loss(jax.nn.softmax(logits), ids, 2)), 1.5, rtol=1e-6)


def test_switch_loss_gradient_flows_through_probs_only():
    logits = jnp.array([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    _, ids = topk_softmax(logits, 1)
    grad = jax.grad(lambda z: load_balancing_loss(jax.nn.softmax(z), ids, 2))(logits)
    # d/dz0 of 2 * mean(p0) with p0 = softmax: 2 * (1/2) * p0 * (1 - p0) = 3/16 per token
    np.testing.assert_allclose(np.asarray(grad), [[3 / 16, -3 / 16]] * 2, rtol=1e-5)


def test_z_loss_matches_numpy_formula():
    logits = np.random.default_rng(5).normal(size=(7, 5)) * 3
    want = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(logits, jnp.float32))), want, rtol=1e-5)


def test_router_stats_hand_values():
    probs = jnp.full((3, 4), 0.25)
    ids = jnp.array([[0, 1], [0, 2], [0, 3]])
    stats = router_stats(probs, ids, 4)
    np.testing.assert_allclose(np.asarray(stats["expert_load"]), [3 / 6, 1 / 6, 1 / 6, 1 / 6], rtol=1e-6)
    np.testing.assert_allclose(float(stats["router_entropy"]), math.log(4), rtol=1e-6)


def test_unimplemented_dispatch_is_named():
    with pytest.raises(NotImplementedError, match="capacity"):
        MoEBlock(moe_cfg("capacity"), rngs=nnx.Rngs(0))
