"""rows_matmul: the projections' matmul with its CPU gradient (models/matmul.py), against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.models import matmul
from mixtral_jax.models.matmul import SAVE_NAME, rows_matmul
from mixtral_jax.models.transformer import REMAT_POLICIES


def _operands(dtype):
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((12, 5), (5, 7), (12, 7)))
    return x, w, g, jnp.asarray(x, dtype), jnp.asarray(w, dtype)


@pytest.mark.parametrize("dtype,out_dtype,tol", [(jnp.float32, None, 1e-5), (jnp.bfloat16, jnp.float32, 2e-2)])
def test_value_and_gradients_match_numpy(dtype, out_dtype, tol):
    x, w, g, xj, wj = _operands(dtype)
    out, vjp = jax.vjp(lambda a, b: rows_matmul(a, b, out_dtype), xj, wj)
    assert out.dtype == (out_dtype or dtype)
    dx, dw = vjp(jnp.asarray(g, out.dtype))
    assert dx.dtype == dtype and dw.dtype == dtype
    # bf16 operands: numpy sees the same rounded values
    xr, wr = np.asarray(xj, np.float32), np.asarray(wj, np.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), xr @ wr, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dx, np.float32), g @ wr.T, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(dw, np.float32), xr.T @ g, rtol=tol, atol=tol)


def test_cpu_takes_the_custom_gradient_and_the_switch_turns_it_off(monkeypatch):
    _, _, _, x, w = _operands(jnp.float32)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a, b: rows_matmul(a, b).sum(), argnums=1))(x, w))
    assert "optimization_barrier" in jaxpr  # the transposed rows, copied before the weight-gradient dot
    monkeypatch.setattr(matmul, "CPU_GRADIENT", False)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a, b: rows_matmul(a, b).sum(), argnums=1))(x, w))
    assert "optimization_barrier" not in jaxpr


def test_dots_saveable_remat_keeps_the_custom_matmuls_output(capsys):
    _, _, _, x, w = _operands(jnp.float32)

    def layer(a, b):
        return jnp.sum(jnp.tanh(rows_matmul(a, b)))  # tanh's gradient needs the matmul's output

    def saved(policy: str) -> str:
        jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(layer, policy=REMAT_POLICIES[policy]), x, w)
        return capsys.readouterr().out

    assert f"f32[12,7] named '{SAVE_NAME}'" in saved("dots_saveable")
    assert "f32[12,7]" not in saved("full")  # recomputed in the backward pass
