"""The grouped-matmul backends `model.grouped_kernel` chooses between, against `jax.lax.ragged_dot`
on CPU: tokamax (its XLA implementation, the one a CPU has) and our Pallas kernels in Pallas'
interpreter, outputs and the gradients of x and all three expert weights, with empty experts and
the expert-parallel buffer form (rows with id E). And the choice itself: one registry, one-line
errors for unknown or unavailable backends, applied once where the model is built."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.config import ConfigError, load_config
from mixtral_jax.kernels.backend import AUTO_GROUPED, Kernels, grouped_kernel
from mixtral_jax.kernels.grouped import CPU, RAGGED, import_tokamax, ragged_slot_swiglu

N, K, E, D, H = 40, 2, 6, 32, 64


def _problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, E - 2, (N, K))  # experts E-2 and E-1 get no rows: empty groups
    ids[:12] = 1  # one crowded expert
    x = rng.normal(size=(N, D))
    ws = [rng.normal(size=s) * 0.2 for s in ((E, D, H), (E, D, H), (E, H, D))]
    cot = rng.normal(size=(N, K, D))
    return jnp.asarray(ids, jnp.int32), [jnp.asarray(a, jnp.float32) for a in (x, *ws)], jnp.asarray(cot, jnp.float32)


def _value_and_grads(fn, ids, args, cot):
    def loss(*a):
        out = fn(a[0], ids, *a[1:])
        return jnp.sum(out * cot), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    return out, grads


def _assert_matches_ragged_dot(fn, ids, args, cot, tol=2e-4):
    want_out, want_grads = _value_and_grads(ragged_slot_swiglu, ids, args, cot)
    out, grads = _value_and_grads(fn, ids, args, cot)
    np.testing.assert_allclose(out, want_out, rtol=tol, atol=tol)
    for got, want, name in zip(grads, want_grads, ("dx", "dw_gate", "dw_up", "dw_down")):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)
    assert not np.asarray(grads[1])[E - 1].any() and not np.asarray(grads[3])[E - 2].any()  # empty experts


def test_tokamax_ragged_dot_matches_jax_on_empty_groups_with_gradients():
    pytest.importorskip("tokamax", reason="tokamax is in the gpu extra")
    tokamax = import_tokamax()
    rng = np.random.default_rng(1)
    x, w = jnp.asarray(rng.normal(size=(24, 16)), jnp.float32), jnp.asarray(rng.normal(size=(5, 16, 8)), jnp.float32)
    sizes = jnp.asarray([6, 0, 18, 0, 0], jnp.int32)
    ref = lambda x, w: jax.lax.ragged_dot(x, w, sizes)
    for impl in ("xla", None):  # None: tokamax's own preference order, which lands on XLA on a CPU
        got = lambda x, w: tokamax.ragged_dot(x, w, sizes, implementation=impl)
        np.testing.assert_allclose(got(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
        cot = jnp.asarray(rng.normal(size=(24, 8)), jnp.float32)
        g_got = jax.grad(lambda x, w: jnp.sum(got(x, w) * cot), argnums=(0, 1))(x, w)
        g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * cot), argnums=(0, 1))(x, w)
        for a, b in zip(g_got, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_tokamax_grouped_swiglu_matches_ragged_dot():
    pytest.importorskip("tokamax", reason="tokamax is in the gpu extra")
    _assert_matches_ragged_dot(grouped_kernel("tokamax").tokens, *_problem())


def test_interpreted_pallas_grouped_swiglu_matches_ragged_dot():
    _assert_matches_ragged_dot(grouped_kernel("pallas", interpret=True).tokens, *_problem(2))


@pytest.mark.parametrize("name", ["tokamax", "pallas", "cpu"])
def test_buffer_form_leaves_unrouted_rows_zero(name):
    """The expert-parallel receive buffer: rows with id E belong to no expert and give zeros."""
    if name == "tokamax":
        pytest.importorskip("tokamax", reason="tokamax is in the gpu extra")
    ids, args, cot = _problem(3)
    ids = ids.at[::3, 0].set(E)  # every third token's first slot is padding
    kernel = grouped_kernel(name, interpret=True)
    out = kernel.buffer(args[0], ids, *args[1:])
    want = ragged_slot_swiglu(args[0], ids, *args[1:])
    np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-4)
    assert not np.asarray(out)[::3, 0].any()


def test_grouped_kernel_choice_is_validated_and_unavailable_ones_fail_in_one_line(monkeypatch):
    with pytest.raises(ConfigError, match="'model.grouped_kernel': 'tokamx' is not one of auto, tokamax, pallas, "
                                          "ragged_dot, cpu; did you mean 'tokamax'"):
        load_config("configs/quickstart.yaml", ["model.grouped_kernel=tokamx"])
    with pytest.raises(ConfigError, match="pallas runs Triton kernels on NVIDIA GPUs only, not on cpu") as err:
        grouped_kernel("pallas", "cpu")
    assert "\n" not in str(err.value)
    monkeypatch.setitem(sys.modules, "tokamax", None)  # as if not installed: its import raises
    with pytest.raises(ConfigError, match=r"tokamax does not import here .*pip install 'mixtral_jax\[gpu\]'"):
        grouped_kernel("tokamax", "gpu")


def test_auto_is_chosen_per_backend_and_config_choices_apply_once():
    assert {b: Kernels.for_backend(b).grouped.name for b in ("cpu", "tpu")} == {"cpu": "cpu", "tpu": "ragged_dot"}
    assert AUTO_GROUPED["gpu"] == "pallas"
    assert Kernels.for_backend("cpu").exchange == "padded" and Kernels.for_backend("tpu").exchange == "ragged"
    base = Kernels.for_backend("cpu")
    assert base.with_choices("auto", False) == base and base.with_choices("ragged_dot").grouped is RAGGED
    twice = base.with_choices("ragged_dot", True).with_choices("ragged_dot", False)
    assert twice.fp8 and twice.grouped is RAGGED  # applied twice (model, then MoE block): the same
    assert base.with_choices("auto", True) == base.with_choices("auto", True)  # equal statics: no recompiles

    from mixtral_jax.models.moe import MoEBlock

    cfg = load_config("configs/quickstart.yaml", ["model.moe.num_experts=4", "model.grouped_kernel=ragged_dot"]).model
    block = MoEBlock(cfg, kernels=Kernels.for_backend("cpu"), rngs=nnx.Rngs(0))
    assert block.dispatch.keywords["grouped"] is RAGGED
    assert MoEBlock(load_config("configs/quickstart.yaml", ["model.moe.num_experts=4"]).model,
                    rngs=nnx.Rngs(0)).dispatch.keywords["grouped"] is CPU


def test_tokamax_under_expert_parallel_equals_single_device():
    """Inside the expert-parallel shard_map (fsdp x tensor x expert), on its receive buffer."""
    pytest.importorskip("tokamax", reason="tokamax is in the gpu extra")
    import functools

    from mixtral_jax.models.dispatch import dropless
    from test_expert_parallel import _assert_equal_runs

    _assert_equal_runs(functools.partial(dropless, grouped=grouped_kernel("tokamax")),
                       dict(fsdp=2, tensor=2, expert=2), seed=1, skew=True)
