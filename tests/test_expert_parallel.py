"""Expert-parallel dispatch (all-to-all under shard_map) against the single-device dispatchers:
outputs, dropped fractions and gradients equal, on several meshes, including routings so skewed
that every token goes to one device's experts. The whole-model version of this check, three
training steps on five meshes, is in test_sharding.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meshes import mesh_of as _mesh
from mixtral_jax.kernels.grouped import CPU, GroupedSwiGLU
from mixtral_jax.models.dispatch import Experts, capacity
from mixtral_jax.models.dispatch import dropless as dropless_with
from mixtral_jax.models.routing import TokenChoice
from mixtral_jax.parallel.mesh import BATCH_AXES, traced_under

N, D, H, E, K = 64, 16, 32, 8, 2
dropless = functools.partial(dropless_with, grouped=CPU)
MESHES = [dict(fsdp=2, tensor=2, expert=2), dict(data=2, expert=4), dict(expert=8), dict(data=8)]


def _problem(seed: int, skew: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    logits = rng.normal(size=(N, E)).astype(np.float32)
    if skew:  # every token prefers experts 0 and 1, which live on the first expert shard
        logits[:, :2] += 10.0
    weights, ids = jax.lax.top_k(jax.nn.softmax(jnp.asarray(logits)), K)
    experts = [rng.normal(scale=0.2, size=s).astype(np.float32) for s in ((E, D, H), (E, D, H), (E, H, D))]
    return jnp.asarray(x), weights, ids.astype(jnp.int32), experts


def _loss_and_grads(dispatch, mesh: Mesh | None, x, weights, ids, experts):
    def loss(x, weights, w_gate, w_up, w_down):
        y, dropped = dispatch(x, TokenChoice(weights, ids), Experts(w_gate, w_up, w_down))
        return jnp.sum(jnp.sin(y) * jnp.arange(D)), (y, dropped)

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    if mesh is None:
        return jax.jit(fn)(x, weights, *experts)
    tokens = NamedSharding(mesh, P(BATCH_AXES))
    expert_w = NamedSharding(mesh, P("expert"))
    args = (jax.device_put(x, tokens), jax.device_put(weights, tokens),
            *(jax.device_put(w, expert_w) for w in experts))
    return jax.jit(traced_under(mesh, fn))(*args)


def _assert_equal_runs(dispatch, sizes, seed=0, skew=False):
    x, weights, ids, experts = _problem(seed, skew)
    (l0, (y0, d0)), g0 = _loss_and_grads(dispatch, None, x, weights, ids, experts)
    (l1, (y1, d1)), g1 = _loss_and_grads(dispatch, _mesh(sizes), x, weights, ids, experts)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    assert float(d1) == float(d0)
    for name, a, b in zip(("x", "weights", "w_gate", "w_up", "w_down"), g1, g0):
        # tolerance relative to the array's scale: the tensor split sums hidden units in another order
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()), err_msg=name)
    return float(d0)


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_dropless_expert_parallel_equals_single_device(sizes):
    _assert_equal_runs(dropless, sizes)
    _assert_equal_runs(dropless, sizes, seed=1, skew=True)  # the worst case for the send buffers


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_capacity_expert_parallel_drops_the_same_slots(sizes):
    dispatch = functools.partial(capacity, capacity_factor=0.75, grouped=CPU)
    assert _assert_equal_runs(dispatch, sizes) > 0
    assert _assert_equal_runs(dispatch, sizes, seed=1, skew=True) > 0.5


def test_expert_mesh_exchanges_with_all_to_all_and_token_meshes_stay_local():
    x, weights, ids, experts = _problem(0)

    def compiled(sizes):
        mesh = _mesh(sizes)
        fn = traced_under(mesh, lambda x, w: dropless(x, TokenChoice(w, ids), Experts(*experts))[0])
        tokens = NamedSharding(mesh, P(BATCH_AXES))
        return jax.jit(fn).lower(jax.device_put(x, tokens), jax.device_put(weights, tokens)).compile().as_text()

    # rows and local expert ids out, results back; no weight or token all-gathers
    expert_mesh = compiled(dict(data=2, expert=4))
    assert expert_mesh.count("all-to-all(") == 3 and "all-gather(" not in expert_mesh
    data_only = compiled(dict(data=8))  # the exchange is over an axis of size 1: nothing moves
    assert "all-to-all(" not in data_only and "all-gather(" not in data_only


def test_pallas_kernels_under_expert_parallel_equal_single_device():
    """The GPU's grouped-matmul kernels (run here in Pallas' interpret mode) inside the
    expert-parallel shard_map, tokens and weights split over fsdp x tensor x expert: the same
    outputs and gradients as the single-device dispatcher (the CPU layouts)."""
    from mixtral_jax.kernels.grouped import pallas_slot_swiglu

    interpreted = functools.partial(pallas_slot_swiglu, block=16, interpret=True)
    pallas = GroupedSwiGLU("pallas (interpreted)", tokens=CPU.tokens, buffer=interpreted)
    _assert_equal_runs(functools.partial(dropless_with, grouped=pallas), dict(fsdp=2, tensor=2, expert=2),
                       seed=1, skew=True)
