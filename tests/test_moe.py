"""MoE block against per-token numpy loops and hand values; losses; router state in the model."""

import math

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mixtral_jax.config import load_config
from mixtral_jax.kernels.grouped import CPU
from mixtral_jax.models.dispatch import Experts, capacity, dense, dropless, expert_choice_dispatch
from mixtral_jax.models.moe import STAT_KEYS, MoEBlock, update_router_biases
from mixtral_jax.models.routing import (
    ExpertChoice,
    RouterBias,
    load_balancing_loss,
    router_stats,
    router_z_loss,
    topk_softmax,
)
from mixtral_jax.models.transformer import Transformer

DIM, HIDDEN, E = 8, 12, 4


def moe_cfg(dispatch="dropless", top_k=2, **moe):
    overrides = [f"model.dim={DIM}", f"model.hidden_dim={HIDDEN}", f"model.moe.num_experts={E}",
                 f"model.moe.top_k={top_k}", f"model.moe.dispatch={dispatch}"]
    overrides += [f"model.moe.{k}={v}" for k, v in moe.items()]
    return load_config("configs/model/tiny_moe.yaml", overrides).model


def call(block, x):
    graphdef, state = nnx.split(block)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(x))


def np_moe(x, router, w_gate, w_up, w_down, k):
    """Per token: top-k router logits, softmax over them, weighted sum of the chosen experts."""
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        logits = x[n] @ router
        top = np.argsort(-logits, kind="stable")[:k]
        w = np.exp(logits[top] - logits[top].max())
        w /= w.sum()
        for wj, e in zip(w, top):
            gate, up = x[n] @ w_gate[e], x[n] @ w_up[e]
            out[n] += wj * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    return out


def block_weights(block: MoEBlock):
    return [np.asarray(p[...], np.float64) for p in (block.router, block.w_gate, block.w_up, block.w_down)]


@pytest.mark.parametrize("dispatch,router", [
    ("dropless", "topk_softmax"), ("dense", "topk_softmax"), ("capacity", "topk_softmax"),
    ("dropless", "softmax_topk"),  # renormalised below: the same routing as Mixtral's
])
def test_moe_block_matches_numpy_loop(dispatch, router):
    extra = {"capacity_factor": float(E)} if dispatch == "capacity" else {}  # C = N: nothing dropped
    block = MoEBlock(moe_cfg(dispatch, router=router, renormalize="true", **extra), rngs=nnx.Rngs(0))
    block.router[...] = jax.random.normal(jax.random.key(1), (DIM, E))  # decisive routing
    x = np.random.default_rng(0).normal(size=(2, 5, DIM)).astype(np.float32)
    y, stats = call(block, x)
    want = np_moe(x.reshape(10, DIM).astype(np.float64), *block_weights(block), k=2).reshape(2, 5, DIM)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-6)
    assert set(stats) == set(STAT_KEYS)
    assert stats["expert_load"].shape == (E,) and float(stats["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(float(stats["expert_load"].sum()), 1.0, rtol=1e-6)


def test_capacity_block_reports_drops_and_load_before_dropping():
    block = MoEBlock(moe_cfg("capacity", capacity_factor=0.25), rngs=nnx.Rngs(0))
    block.router[...] = jnp.zeros((DIM, E)).at[0, 1].set(5.0)  # feature 0 > 0 -> expert 1
    x = np.abs(np.random.default_rng(1).normal(size=(1, 16, DIM))).astype(np.float32)
    _, stats = call(block, x)
    # every token: expert 1, then expert 0 (a tie of zero logits goes to the lowest id).
    # C = ceil(2 * 16 / 4 * 0.25) = 2 of each one's 16 slots kept: 28 of 32 slots dropped
    np.testing.assert_allclose(float(stats["dropped_fraction"]), 28 / 32, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["expert_load"]), [0.5, 0.5, 0, 0])  # routed, not kept


def test_expert_choice_block_stats_and_dense_reference():
    blocks = [MoEBlock(moe_cfg(d, router="expert_choice", capacity_factor=1.0), rngs=nnx.Rngs(0))
              for d in ("dropless", "dense")]
    x = np.random.default_rng(2).normal(size=(2, 6, DIM)).astype(np.float32)
    (y, stats), (y_dense, _) = (call(b, x) for b in blocks)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_dense), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["expert_load"]), np.full(E, 1 / E), rtol=1e-6)
    assert float(stats["aux_loss"]) == pytest.approx(1.0)  # f uniform by construction
    assert 0.0 <= float(stats["dropped_fraction"]) < 1.0  # share of tokens no expert picked


def test_meaningless_combination_is_refused():
    with pytest.raises(ValueError, match="bias_update_rate"):
        MoEBlock(moe_cfg(router="expert_choice", bias_update_rate=0.01), rngs=nnx.Rngs(0))


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, those inside nested jaxprs (custom gradients, pjit) included."""
    for eq in jaxpr.eqns:
        yield eq
        for param in eq.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from _all_eqns(inner)


def test_router_dtype_applies_to_weight_and_logits():
    block = MoEBlock(moe_cfg(router_dtype="bfloat16"), rngs=nnx.Rngs(0))
    assert block.router[...].dtype == jnp.bfloat16
    x = jnp.ones((1, 4, DIM))
    graphdef, state = nnx.split(block)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(x))(state)
    # The router matmul (the only [4, E] dot) runs in bfloat16. Its value is not compared: XLA may
    # keep excess precision under jit (xla_allow_excess_precision), so it is not bit-exact bf16.
    router_dots = [eq for eq in _all_eqns(jaxpr.jaxpr) if eq.primitive.name == "dot_general"
                   and eq.outvars[0].aval.shape == (4, E)]
    assert [eq.outvars[0].aval.dtype for eq in router_dots] == [jnp.bfloat16]


def test_dispatchers_under_jit_with_all_slots_on_one_expert():
    """Direct call: every token's both slots on expert 1 (group sizes [0, 2N, 0, 0])."""
    n = 6
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[3], (n, DIM))
    ex = Experts(*(jax.random.normal(k, s) for k, s in zip(keys, [(E, DIM, HIDDEN)] * 2 + [(E, HIDDEN, DIM)])))
    routing = topk_softmax(jnp.zeros((n, E)).at[:, 1].set(1.0), 1)._replace(weights=jnp.ones((n, 1)))
    gate, up = x @ ex.w_gate[1], x @ ex.w_up[1]
    want = np.asarray((jax.nn.silu(gate) * up) @ ex.w_down[1])
    for fn in (lambda *a: dropless(*a, grouped=CPU), dense, lambda *a: capacity(*a, capacity_factor=4.0, grouped=CPU)):
        y, dropped = jax.jit(fn)(x, routing, ex)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
        assert float(dropped) == 0.0
    table = ExpertChoice(jnp.ones((E, n)).at[jnp.array([0, 2, 3])].set(0.0), jnp.tile(jnp.arange(n), (E, 1)))
    np.testing.assert_allclose(np.asarray(jax.jit(expert_choice_dispatch)(x, table, ex)[0]), want, rtol=1e-5, atol=1e-5)


def test_topk_softmax_hand_values():
    weights, ids = topk_softmax(jnp.array([[1.0, 3.0, 2.0, 0.0]]), 2)
    np.testing.assert_array_equal(np.asarray(ids), [[1, 2]])
    np.testing.assert_allclose(np.asarray(weights), [[math.e / (math.e + 1), 1 / (math.e + 1)]], rtol=1e-6)


def assigned_of(ids, num_experts):
    return jnp.sum(jax.nn.one_hot(ids, num_experts), axis=1)


@pytest.mark.parametrize("k", [1, 2])
def test_switch_loss_is_one_at_perfect_balance(k):
    # token i strongly prefers expert i, then i+1: every expert gets the same number of slots,
    # and by symmetry the mean softmax probability is uniform.
    logits = jnp.array([[4.0 if e == i else (2.0 if e == (i + 1) % 4 else 0.0) for e in range(4)] for i in range(4)])
    _, ids = topk_softmax(logits, k)
    loss = load_balancing_loss(jax.nn.softmax(logits)[None], assigned_of(ids, 4)[None])
    np.testing.assert_allclose(float(loss), 1.0, rtol=1e-6)


def test_switch_loss_unbalanced_hand_value():
    # both tokens: probs [3/4, 1/4], top-1 = expert 0 -> f = [1, 0], P = [3/4, 1/4];
    # loss = E * sum f*P = 2 * 3/4 = 1.5
    logits = jnp.array([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    _, ids = topk_softmax(logits, 1)
    loss = load_balancing_loss(jax.nn.softmax(logits)[None], assigned_of(ids, 2)[None])
    np.testing.assert_allclose(float(loss), 1.5, rtol=1e-6)


def test_switch_loss_gradient_flows_through_probs_only():
    logits = jnp.array([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    assigned = assigned_of(topk_softmax(logits, 1).expert_ids, 2)[None]
    grad = jax.grad(lambda z: load_balancing_loss(jax.nn.softmax(z)[None], assigned))(logits)
    # d/dz0 of 2 * mean(p0) with p0 = softmax: 2 * (1/2) * p0 * (1 - p0) = 3/16 per token
    np.testing.assert_allclose(np.asarray(grad), [[3 / 16, -3 / 16]] * 2, rtol=1e-5)


def test_z_loss_matches_numpy_formula():
    logits = np.random.default_rng(5).normal(size=(7, 5)) * 3
    want = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
    np.testing.assert_allclose(float(router_z_loss(jnp.asarray(logits, jnp.float32))), want, rtol=1e-5)


def test_router_stats_hand_values():
    probs = jnp.full((3, 4), 0.25)
    assigned = assigned_of(jnp.array([[0, 1], [0, 2], [0, 3]]), 4)
    stats = router_stats(probs, assigned)
    np.testing.assert_allclose(np.asarray(stats["expert_load"]), [3 / 6, 1 / 6, 1 / 6, 1 / 6], rtol=1e-6)
    np.testing.assert_allclose(float(stats["router_entropy"]), math.log(4), rtol=1e-6)


def test_router_bias_and_jitter_in_the_transformer():
    """RouterBias sits in the non-Param model state as [n_layers, E]; update_router_biases moves it;
    router_rng reaches every layer through the scan; the functional grad pattern works."""
    # test_transformer's sizes, so a full run shares the (slow, eager) parameter-init compiles
    cfg = load_config("configs/model/tiny_moe.yaml", [
        "model.n_layers=2", "model.vocab_size=128", "model.dim=32", "model.hidden_dim=48", "model.head_dim=8",
        "model.sliding_window=6", "model.moe.bias_update_rate=0.01", "model.moe.jitter=0.2"]).model
    graphdef, params, model_state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    (path, bias), = nnx.to_flat_state(model_state)
    assert path == ("blocks", "ffn", "router_bias") and isinstance(bias, RouterBias) and bias.shape == (2, 8)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 8)), jnp.int32)

    @jax.jit
    def loss_and_aux(params, model_state, rng):
        def loss(p):
            # copy=True: model_state's Variables come from the outer (jit) trace; nnx.scan refuses
            # Variables of another trace level, so merge fresh copies inside jax.grad.
            logits, aux = nnx.merge(graphdef, p, model_state, copy=True)(tokens, router_rng=rng)
            return jnp.mean(logits ** 2) + aux["aux_loss"], aux
        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, aux), grads = loss_and_aux(params, model_state, jax.random.key(1))
    (_, aux_other), _ = loss_and_aux(params, model_state, jax.random.key(2))  # (no key: test_routing)
    assert float(aux_other["z_loss"]) != float(aux["z_loss"])
    assert "router_bias" not in grads["blocks"]["ffn"]
    new_state = update_router_biases(model_state, aux["expert_load"], 0.01)
    load = np.asarray(aux["expert_load"])
    want = 0.01 * np.sign(load.mean(-1, keepdims=True) - load)
    np.testing.assert_allclose(np.asarray(new_state["blocks"]["ffn"]["router_bias"][...]), want, atol=1e-7)
