"""Routers, balancing losses, loss-free bias and jitter against numpy references and hand values."""

import math

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mixtral_jax.config import load_config
from mixtral_jax.models.moe import MoEBlock
from mixtral_jax.models.routing import (
    ExpertChoice,
    expert_choice,
    expert_choice_capacity,
    jitter,
    load_balancing_loss,
    softmax_topk,
    topk_softmax,
    update_router_bias,
)

# Hand-made logits with ties: row 1 a three-way tie, row 2 a tie for first, row 3 all equal,
# rows 4 and 5 identical tokens (ties between tokens for expert choice).
LOGITS = np.array([
    [1.0, 3.0, 2.0, 0.0],
    [2.0, 2.0, 2.0, 1.0],
    [0.0, 5.0, 5.0, -1.0],
    [-1.0, -1.0, -1.0, -1.0],
    [0.5, -2.0, 1.5, 3.0],
    [0.5, -2.0, 1.5, 3.0],
], np.float32)


def np_softmax(z, axis=-1):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_topk_ids(scores, k):
    """Largest k per row; among equal scores the lowest index first (stable sort of -scores)."""
    return np.argsort(-np.asarray(scores, np.float64), axis=-1, kind="stable")[:, :k]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_softmax_matches_numpy_with_ties(k):
    routing = topk_softmax(jnp.asarray(LOGITS), k)
    ids = np_topk_ids(LOGITS, k)
    np.testing.assert_array_equal(np.asarray(routing.expert_ids), ids)
    want = np_softmax(np.take_along_axis(LOGITS, ids, -1))
    np.testing.assert_allclose(np.asarray(routing.weights), want, rtol=1e-6)
    if k == 2:  # the tie rule spelled out: lowest expert index wins
        np.testing.assert_array_equal(np.asarray(routing.expert_ids)[1:4], [[0, 1], [1, 2], [0, 1]])


@pytest.mark.parametrize("k", [1, 2])
def test_softmax_topk_plain_and_renormalised(k):
    probs = np_softmax(LOGITS)
    plain = softmax_topk(jnp.asarray(LOGITS), k)
    ids = np_topk_ids(LOGITS, k)
    np.testing.assert_array_equal(np.asarray(plain.expert_ids), ids)
    np.testing.assert_allclose(np.asarray(plain.weights), np.take_along_axis(probs, ids, -1), rtol=1e-6)
    renorm = softmax_topk(jnp.asarray(LOGITS), k, renormalize=True)
    reference = topk_softmax(jnp.asarray(LOGITS), k)
    np.testing.assert_array_equal(np.asarray(renorm.expert_ids), np.asarray(reference.expert_ids))
    np.testing.assert_allclose(np.asarray(renorm.weights), np.asarray(reference.weights), rtol=1e-6)


def test_selection_bias_changes_choice_not_weights():
    bias = np.array([0.0, -10.0, 0.0, 2.5], np.float32)
    ids = np_topk_ids(LOGITS + bias, 2)
    probs = np_softmax(LOGITS)
    tk = topk_softmax(jnp.asarray(LOGITS), 2, jnp.asarray(bias))
    np.testing.assert_array_equal(np.asarray(tk.expert_ids), ids)
    np.testing.assert_allclose(np.asarray(tk.weights), np_softmax(np.take_along_axis(LOGITS, ids, -1)), rtol=1e-6)
    st = softmax_topk(jnp.asarray(LOGITS), 2, jnp.asarray(bias))
    np.testing.assert_array_equal(np.asarray(st.expert_ids), ids)
    np.testing.assert_allclose(np.asarray(st.weights), np.take_along_axis(probs, ids, -1), rtol=1e-6)
    assert not np.array_equal(ids, np_topk_ids(LOGITS, 2))  # the bias did change the choice


@pytest.mark.parametrize("factor,capacity", [(1.0, 2), (2.0, 3), (0.1, 1), (10.0, 6)])
def test_expert_choice_matches_numpy(factor, capacity):
    n, e = LOGITS.shape
    assert expert_choice_capacity(n, e, factor) == capacity  # ceil(6 * factor / 4), within [1, 6]
    routing = expert_choice(jnp.asarray(LOGITS), factor)
    assert isinstance(routing, ExpertChoice) and routing.token_idx.shape == (e, capacity)
    probs = np_softmax(LOGITS)
    token_idx = np_topk_ids(probs.T, capacity)  # each expert: its best tokens, lowest index on ties
    np.testing.assert_array_equal(np.asarray(routing.token_idx), token_idx)
    np.testing.assert_allclose(np.asarray(routing.gates), np.take_along_axis(probs.T, token_idx, -1), rtol=1e-6)
    for row in np.asarray(routing.token_idx):  # every expert exactly C distinct tokens
        assert len(set(row.tolist())) == capacity
    if factor == 1.0:  # expert 3 prefers the identical tokens 4 and 5: the tie keeps order
        np.testing.assert_array_equal(np.asarray(routing.token_idx)[3], [4, 5])


def test_expert_choice_capacity_rounding():
    assert expert_choice_capacity(100, 10, 1.1) == 11  # 11.000000000000002 does not become 12
    assert expert_choice_capacity(8, 4, 1.25) == 3


def np_aux_loss(probs, assigned):
    """probs, assigned: [G, S, E] -> mean over groups of E * sum_i f_i P_i."""
    losses = []
    for p, a in zip(probs, assigned):
        f = a.sum(0) / max(a.sum(), 1.0)
        losses.append(p.shape[-1] * np.sum(f * p.mean(0)))
    return np.mean(losses)


def test_sequence_aux_loss_matches_numpy():
    rng = np.random.default_rng(0)
    b, t, e, k = 3, 5, 4, 2
    logits = rng.normal(size=(b * t, e)) * 2
    probs = np_softmax(logits)
    assigned = np.zeros((b * t, e))
    np.put_along_axis(assigned, np_topk_ids(logits, k), 1.0, -1)
    seq = load_balancing_loss(jnp.asarray(probs.reshape(b, t, e), jnp.float32), jnp.asarray(assigned.reshape(b, t, e)))
    np.testing.assert_allclose(float(seq), np_aux_loss(probs.reshape(b, t, e), assigned.reshape(b, t, e)), rtol=1e-5)
    whole = load_balancing_loss(jnp.asarray(probs[None], jnp.float32), jnp.asarray(assigned[None]))
    np.testing.assert_allclose(float(whole), np_aux_loss(probs[None], assigned[None]), rtol=1e-5)
    assert abs(float(seq) - float(whole)) > 1e-3  # the scopes really differ on this input


DIM, HIDDEN, E = 8, 12, 4


def moe_cfg(*overrides):
    base = [f"model.dim={DIM}", f"model.hidden_dim={HIDDEN}", f"model.moe.num_experts={E}", "model.moe.top_k=2"]
    return load_config("configs/model/tiny_moe.yaml", [*base, *overrides]).model


def call(block, x, rng=None):
    """One jitted block call (eager op-by-op dispatch compiles every primitive separately)."""
    graphdef, state = nnx.split(block)
    return jax.jit(lambda s, x, rng: nnx.merge(graphdef, s)(x, rng))(state, jnp.asarray(x), rng)


def test_block_sequence_scope_aux_loss_matches_numpy():
    block = MoEBlock(moe_cfg("model.moe.aux_loss_scope=sequence"), rngs=nnx.Rngs(0))
    block.router[...] = jax.random.normal(jax.random.key(1), (DIM, E))
    x = np.random.default_rng(1).normal(size=(3, 6, DIM)).astype(np.float32)
    _, stats = call(block, x)
    logits = x.reshape(-1, DIM).astype(np.float64) @ np.asarray(block.router[...], np.float64)
    assigned = np.zeros_like(logits)
    np.put_along_axis(assigned, np_topk_ids(logits, 2), 1.0, -1)
    want = np_aux_loss(np_softmax(logits).reshape(3, 6, E), assigned.reshape(3, 6, E))
    np.testing.assert_allclose(float(stats["aux_loss"]), want, rtol=1e-5)


def test_hf_mixtral_loss_is_top_k_times_ours_for_one_layer():
    """Cross-check of the routing.py docstring against transformers' own function."""
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = np.random.default_rng(2).normal(size=(10, 4)).astype(np.float32) * 2
    for k in (1, 2):
        assigned = np.zeros_like(logits)
        np.put_along_axis(assigned, np_topk_ids(logits, k), 1.0, -1)
        ours = float(load_balancing_loss(jax.nn.softmax(jnp.asarray(logits))[None], jnp.asarray(assigned)[None]))
        theirs = float(hf.load_balancing_loss_func((torch.tensor(logits),), 4, k))
        np.testing.assert_allclose(theirs, k * ours, rtol=1e-5)
    balanced = torch.tensor([[4.0 if e == i else (2.0 if e == (i + 1) % 4 else 0.0) for e in range(4)]
                             for i in range(4)])
    assert abs(float(hf.load_balancing_loss_func((balanced, balanced), 4, 2)) - 2.0) < 1e-5  # top_k at balance


def test_update_router_bias_sign_rule():
    load = jnp.array([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])
    new = update_router_bias(jnp.zeros((2, 4)), load, 0.1)
    np.testing.assert_allclose(np.asarray(new), [[-0.1, 0.0, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]], atol=1e-7)


def test_loss_free_bias_balances_a_skewed_router():
    """No aux loss and no training: only bias updates, and the load evens out."""
    block = MoEBlock(moe_cfg("model.moe.bias_update_rate=0.05", "model.moe.aux_loss_coef=0"), rngs=nnx.Rngs(0))
    router = 0.3 * jax.random.normal(jax.random.key(2), (DIM, E))
    block.router[...] = router.at[0].set(jnp.array([2.0, 1.0, 0.0, -1.0]))  # feature 0 ~ 1: skewed
    x = np.random.default_rng(3).normal(size=(4, 16, DIM)).astype(np.float32)
    x[..., 0] += 1.0
    x = jnp.asarray(x)
    graphdef, state = nnx.split(block)
    run = jax.jit(lambda s: nnx.merge(graphdef, s)(x)[1]["expert_load"])

    def imbalance(load):
        return float(jnp.max(load) / jnp.mean(load))

    first = imbalance(run(state))
    for _ in range(40):
        load = run(state)
        state["router_bias"][...] = update_router_bias(state["router_bias"][...], load, 0.05)
    last = imbalance(run(state))
    assert first > 1.5 and last < 1.2, (first, last)


def np_moe(x, router, bias, w_gate, w_up, w_down, k):
    """Per token: choose by logits + bias, weight by softmax of the unbiased chosen logits."""
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        logits = x[n] @ router
        top = np_topk_ids((logits + bias)[None], k)[0]
        for wj, e in zip(np_softmax(logits[top]), top):
            gate, up = x[n] @ w_gate[e], x[n] @ w_up[e]
            out[n] += wj * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    return out


def test_router_bias_moves_selection_only():
    block = MoEBlock(moe_cfg("model.moe.bias_update_rate=0.01"), rngs=nnx.Rngs(0))
    assert block.router_bias.shape == (E,) and not np.any(np.asarray(block.router_bias[...]))
    bias = np.array([0.0, 0.0, 0.3, -0.3], np.float32)
    block.router_bias[...] = jnp.asarray(bias)
    block.router[...] = jax.random.normal(jax.random.key(1), (DIM, E))
    x = np.random.default_rng(4).normal(size=(2, 5, DIM)).astype(np.float32)
    y, _ = call(block, x)
    weights = [np.asarray(p[...], np.float64) for p in (block.router, block.w_gate, block.w_up, block.w_down)]
    want = np_moe(x.reshape(10, DIM).astype(np.float64), weights[0], bias, *weights[1:], k=2)
    np.testing.assert_allclose(np.asarray(y).reshape(10, DIM), want, rtol=1e-4, atol=1e-6)
    # and it is not a Param: no gradient, no optimizer state
    assert "router_bias" not in nnx.state(block, nnx.Param)


def test_jitter_bounds_and_switch():
    x = jnp.ones((64, 8))
    noisy = np.asarray(jitter(x, jax.random.key(0), 0.1))
    assert noisy.min() >= 0.9 and noisy.max() <= 1.1 and noisy.std() > 0.01

    block = MoEBlock(moe_cfg("model.moe.jitter=0.5"), rngs=nnx.Rngs(0))
    quiet = MoEBlock(moe_cfg("model.moe.jitter=0"), rngs=nnx.Rngs(0))
    xs = np.random.default_rng(5).normal(size=(2, 6, DIM)).astype(np.float32)
    y_plain, s_plain = call(block, xs)  # no key: no noise
    y_quiet, _ = call(quiet, xs, jax.random.key(7))  # key but jitter 0: no noise
    y_noisy, s_noisy = call(block, xs, jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(y_plain), np.asarray(y_quiet))
    assert float(s_noisy["z_loss"]) != float(s_plain["z_loss"])  # router logits changed
    assert not np.allclose(np.asarray(y_noisy), np.asarray(y_plain))
    y_again, _ = call(block, xs, jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(y_noisy), np.asarray(y_again))
    assert math.isfinite(float(s_noisy["aux_loss"]))
