"""rows_matmul: the projections' matmul with its CPU gradient (kernels/matmul.py), against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.config.choices import REMAT_POLICIES
from mixtral_jax.kernels.backend import Kernels
from mixtral_jax.kernels.matmul import SAVE_NAME, rows_matmul


def _operands(dtype):
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((12, 5), (5, 7), (12, 7)))
    return x, w, g, jnp.asarray(x, dtype), jnp.asarray(w, dtype)


@pytest.mark.parametrize("custom_gradient", [True, False])
@pytest.mark.parametrize("dtype,out_dtype,tol", [(jnp.float32, None, 1e-5), (jnp.bfloat16, jnp.float32, 2e-2)])
def test_value_and_gradients_match_numpy(dtype, out_dtype, tol, custom_gradient):
    x, w, g, xj, wj = _operands(dtype)
    out, vjp = jax.vjp(lambda a, b: rows_matmul(a, b, out_dtype, custom_gradient=custom_gradient), xj, wj)
    assert out.dtype == (out_dtype or dtype)
    dx, dw = vjp(jnp.asarray(g, out.dtype))
    assert dx.dtype == dtype and dw.dtype == dtype
    # bf16 operands: numpy sees the same rounded values
    xr, wr = np.asarray(xj, np.float32), np.asarray(wj, np.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), xr @ wr, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dx, np.float32), g @ wr.T, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dw, np.float32), xr.T @ g, rtol=tol, atol=tol)


def test_cpu_kernels_take_the_custom_gradient_and_other_backends_do_not():
    _, _, _, x, w = _operands(jnp.float32)

    def weight_gradient_jaxpr(kernels: Kernels) -> str:
        return str(jax.make_jaxpr(jax.grad(lambda a, b: kernels.matmul(a, b).sum(), argnums=1))(x, w))

    cpu = Kernels.for_backend("cpu")
    assert "optimization_barrier" in weight_gradient_jaxpr(cpu)  # the transposed rows, copied first
    assert "optimization_barrier" not in weight_gradient_jaxpr(cpu.replace(matmul_custom_gradient=False))
    assert "optimization_barrier" not in weight_gradient_jaxpr(Kernels.for_backend("tpu"))


def test_dots_saveable_remat_keeps_the_custom_matmuls_output(capsys):
    _, _, _, x, w = _operands(jnp.float32)

    def layer(a, b):
        return jnp.sum(jnp.tanh(rows_matmul(a, b, custom_gradient=True)))  # tanh's gradient needs the output

    def saved(policy: str) -> str:
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(layer, policy=REMAT_POLICIES.get(policy)), x, w)
        return capsys.readouterr().out

    assert f"f32[12,7] named '{SAVE_NAME}'" in saved("dots_saveable")
    assert "f32[12,7]" not in saved("full")  # recomputed in the backward pass
