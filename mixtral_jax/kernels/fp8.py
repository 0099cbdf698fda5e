"""FP8 matmul inputs (`model.fp8`): every operand of the expert matmuls and the dense projections
rounded to float8 e4m3 values times a scale, the gradient passed straight through.

Scales come from qwix (`qwix.quantize` with absmax calibration, `qwix.dequantize`): one per row
of the activations (a token's row; the row is the unit every layout moves, so per-row scales
do not depend on how rows are sorted or exchanged) and one per output channel of a weight (per
expert and output channel for the stacked [E, in, out] expert weights).

Quantize-dequantize ("fake quant") rather than qwix's model interception (`qwix.quantize_model`
with a `QtProvider`): interception rewrites `dot_general` / `einsum` / `ragged_dot` calls it
sees, and our expert matmuls are custom kernels (Pallas, the CPU runs with a hand-written
backward, tokamax) that it cannot see into. The expert inputs are rounded in the MoE block
before dispatch (`Kernels.expert_inputs`), on the global arrays, so every kernel, dispatcher
and mesh sees the same FP8 values (per-shard scales would differ with the mesh). The matmuls
then run in the compute dtype, so this changes numerics, not speed (whether XLA fuses the
rounding into FP8 GEMMs is for `benchmarks/gpu_check.sh` to show), and the SwiGLU hidden
activation between an expert's up and down matmuls, made inside the grouped kernel, stays in
the compute dtype.

Gradients are straight-through (d fake_quant(a) / da = 1): each backward matmul takes the
rounded operands its forward saved and the unrounded incoming gradient (FP8 forward, the
gradients in the compute dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mixtral_jax.kernels.grouped import GroupedSwiGLU, SlotSwiGLU

FP8 = jnp.float8_e4m3fn


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quant(a: jax.Array, channel_axes: tuple[int, ...]) -> jax.Array:
    """a rounded to FP8 e4m3 times one absmax scale per index of `channel_axes` (the scale is
    shared over the other axes), in a's dtype; straight-through gradient."""
    import qwix  # an optional extra (gpu, test): imported when a model turns FP8 on

    q = qwix.quantize(a.astype(jnp.float32), FP8, channelwise_axes=channel_axes)
    return qwix.dequantize(q).astype(a.dtype)


def _fake_quant_fwd(a, channel_axes):
    return fake_quant(a, channel_axes), None


def _fake_quant_bwd(channel_axes, _, g):
    return (g,)


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def matmul_inputs(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [N, K] per row, w [K, M] per output column."""
    return fake_quant(x, (0,)), fake_quant(w, (1,))


def expert_inputs(x: jax.Array, *weights: jax.Array) -> tuple[jax.Array, ...]:
    """Token rows [N, D] per row, stacked [E, in, out] expert weights per expert and output channel."""
    return (fake_quant(x, (0,)), *(fake_quant(w, (0, 2)) for w in weights))


def _quantized(fn: SlotSwiGLU) -> SlotSwiGLU:
    def run(x, expert_ids, w_gate, w_up, w_down):
        x, w_gate, w_up, w_down = expert_inputs(x, w_gate, w_up, w_down)
        return fn(x, expert_ids, w_gate, w_up, w_down)

    return run


@functools.cache
def grouped(kernel: GroupedSwiGLU) -> GroupedSwiGLU:
    """`kernel` with its inputs rounded first (benchmarks time one kernel so; a model rounds in
    the MoE block, before dispatch: `Kernels.expert_inputs`)."""
    return GroupedSwiGLU(f"{kernel.name}+fp8", tokens=_quantized(kernel.tokens), buffer=_quantized(kernel.buffer))
