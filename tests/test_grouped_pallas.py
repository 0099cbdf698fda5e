"""The Pallas grouped-matmul kernels (the GPU dropless path), checked on CPU two ways: run in
Pallas' interpret mode against a plain numpy per-slot SwiGLU and its hand-derived gradients, and
lowered for CUDA (Triton IR is generated here, without a GPU) so a kernel the Triton lowering
rejects fails in CI rather than on a rented card."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import grouped_pallas
from mixtral_jax.kernels.grouped import pallas_slot_swiglu


def np_reference(x, ids, wg, wu, wd, cot):
    """out[n, j] = SwiGLU_{ids[n, j]}(x[n]) and the gradients of sum(out * cot), derived by hand."""
    n, k = ids.shape
    out = np.zeros((n, k, x.shape[1]))
    dx, dwg, dwu, dwd = np.zeros_like(x), np.zeros_like(wg), np.zeros_like(wu), np.zeros_like(wd)
    for i in range(n):
        for j in range(k):
            e = ids[i, j]
            g, u = x[i] @ wg[e], x[i] @ wu[e]
            sig = 1 / (1 + np.exp(-g))
            h = g * sig * u
            out[i, j] = h @ wd[e]
            dh = wd[e] @ cot[i, j]
            dwd[e] += np.outer(h, cot[i, j])
            dg = dh * u * sig * (1 + g * (1 - sig))
            du = dh * g * sig
            dwg[e] += np.outer(x[i], dg)
            dwu[e] += np.outer(x[i], du)
            dx[i] += wg[e] @ dg + wu[e] @ du
    return out, (dx, dwg, dwu, dwd)


@pytest.mark.parametrize("block", [16, 32])
def test_interpreted_kernels_match_numpy_forward_and_gradients(block):
    rng = np.random.default_rng(0)
    n, k, e, d, h = 48, 2, 4, 32, 64
    x = rng.normal(size=(n, d))
    ids = rng.integers(0, e - 1, (n, k))  # expert e-1 gets no rows: an empty group
    ids[:20] = 1  # and one crowded expert spanning several blocks
    wg, wu, wd = (rng.normal(size=s) * 0.2 for s in ((e, d, h), (e, d, h), (e, h, d)))
    cot = rng.normal(size=(n, k, d))
    want, want_grads = np_reference(x, ids, wg, wu, wd, cot)

    def f(x, wg, wu, wd):
        out = pallas_slot_swiglu(x, jnp.asarray(ids, jnp.int32), wg, wu, wd, block=block, interpret=True)
        return jnp.sum(out * cot), out

    args = [jnp.asarray(a, jnp.float32) for a in (x, wg, wu, wd)]
    grads, out = jax.grad(f, argnums=(0, 1, 2, 3), has_aux=True)(*args)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-4)
    for got, ref, name in zip(grads, want_grads, ("dx", "dw_gate", "dw_up", "dw_down")):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-4, atol=2e-4, err_msg=name)
    assert not np.asarray(grads[1])[e - 1].any()  # the empty expert's weight gradient is exactly zero


def test_kernels_lower_to_triton_for_cuda_without_a_gpu():
    """Lower the forward + backward of the bf16 grouped SwiGLU for the CUDA platform: the three
    kernels (forward, input gradient, weight gradient) must come out as Triton calls."""
    n, k, e, d, h = 512, 2, 4, 128, 256
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((n, d), (e, d, h), (e, d, h), (e, h, d))]

    def loss(x, wg, wu, wd, ids):
        return jnp.sum(pallas_slot_swiglu(x, ids, wg, wu, wd).astype(jnp.float32) ** 2)

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
        *shapes, jax.ShapeDtypeStruct((n, k), jnp.int32)).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") >= 3 * 3  # 3 matmuls x (forward, dx, dw), before CSE
    assert 'name = "grouped_matmul_weight_grad"' in text


def test_supported_sizes_and_dtypes():
    assert grouped_pallas.supported(4096, 14336, jnp.bfloat16)  # Mixtral 8x7B
    assert not grouped_pallas.supported(4096, 14336, jnp.float32)  # float32 stays on ragged_dot
    assert not grouped_pallas.supported(4096, 14337, jnp.bfloat16)  # no tile divides the width


def _kernel_calls(policy) -> dict[str, int]:
    """Pallas kernel launches in the CUDA lowering of the grouped SwiGLU's gradient under remat."""
    import re

    n, k, e, d, h = 512, 2, 4, 128, 256
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((n, d), (e, d, h), (e, d, h), (e, h, d))]
    layer = jax.checkpoint(lambda x, wg, wu, wd, ids: pallas_slot_swiglu(x, ids, wg, wu, wd), policy=policy)

    def loss(*args):
        return jnp.sum(layer(*args).astype(jnp.float32) ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(
        *shapes, jax.ShapeDtypeStruct((n, k), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    names = re.findall(r'name = "(grouped_matmul\w*)"', text)
    return {name: names.count(name) for name in set(names)}


def test_dots_saveable_keeps_kernel_outputs_instead_of_rerunning_them():
    """The model's dots_saveable policy saves the named kernel outputs: 3 forward + 3 input-gradient
    launches and 3 weight-gradient ones. JAX's own dots_saveable reruns the gate and up kernels."""
    from mixtral_jax.config.choices import REMAT_POLICIES

    assert _kernel_calls(REMAT_POLICIES.get("dots_saveable")) == {"grouped_matmul": 6, "grouped_matmul_weight_grad": 3}
    assert _kernel_calls(jax.checkpoint_policies.dots_saveable)["grouped_matmul"] == 8
