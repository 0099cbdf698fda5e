"""The 2-D matmul every projection runs (token rows [N, K] x weight [K, M]), with its own
gradient for CPU.

Autodiff's weight gradient rows^T @ dout contracts the rows' leading dimension. XLA:CPU hands
that dot to a slower matmul routine than an untransposed one. At the LM head of
`benchmarks/train_step.py` (1024 rows x 512, vocab 8192) it takes 95 ms, against 52 ms when
rows^T is first copied into memory. So on CPU the backward pass copies the rows transposed,
which costs one pass over the activations, and then runs the untransposed matmul. Paired A/B
of that benchmark's train step: 0.944x (dense) and 0.972x (MoE) with the LM head alone, 0.934x
and 0.963x with every projection. Other backends keep autodiff's dot, which their matmul
libraries run at full speed in either layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# checkpoint_name of the CPU matmul's output. dots_saveable remat keeps it (models/transformer.py):
# the custom gradient hides the dot inside from that policy.
SAVE_NAME = "rows_matmul"


def rows_matmul(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None = None, *,
                custom_gradient: bool = False) -> jax.Array:
    """x [N, K] @ w [K, M] -> [N, M], in out_dtype when given (else the operands' result type).
    custom_gradient: the transposed-rows weight gradient (`Kernels.for_backend` turns it on for CPU)."""
    if custom_gradient:
        return checkpoint_name(_cpu_matmul(x, w, out_dtype), SAVE_NAME)
    return jnp.dot(x, w, preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_matmul(x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None) -> jax.Array:
    return jnp.dot(x, w, preferred_element_type=out_dtype)


def _cpu_matmul_fwd(x, w, out_dtype):
    return _cpu_matmul(x, w, out_dtype), (x, w)


def _cpu_matmul_bwd(out_dtype, residuals, d_out):
    x, w = residuals
    dx = jnp.dot(d_out, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    # The barrier keeps XLA from folding the transpose back into the dot as a transposed operand.
    x_t = jax.lax.optimization_barrier(x.T)
    dw = jnp.dot(x_t, d_out, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)
