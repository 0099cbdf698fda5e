"""Grouped SwiGLU for dropless dispatch.

    slot_swiglu(x [N, D], expert_ids [N, k], w_gate [E, D, H], w_up [E, D, H], w_down [E, H, D])
        -> [N, k, D], out[n, j] = SwiGLU_{expert_ids[n, j]}(x[n])

It sorts the N * k slots by expert once, lays the rows out for the backend's grouped matmul,
gathers x into that layout and gathers the results back per slot. (A custom backward making
both moves gathers instead of scatter-adds was tried: no measurable change on CPU.)
Three grouped matmuls, chosen by backend and dtype in `slot_swiglu`:
- `pallas_slot_swiglu` (GPU, 16-bit compute): rows padded per expert to whole blocks, each matmul one
  Pallas (Triton) kernel that reads its block's expert from a table (`grouped_pallas`). XLA's GPU
  `ragged_dot` expands into one dense matmul per expert (measured 7.7x a dense layer of equal
  FLOPs on an H100, jax 0.11.2, with or without its experimental cuDNN ragged-dot flag).
- `ragged_slot_swiglu` (TPU, and GPU float32): rows sorted by expert, `jax.lax.ragged_dot`,
  which XLA lowers to its ragged-dot instruction on TPU (not measured here). On CPU, JAX lowers
  it to one dense matmul over a masked [E, M, D] copy of the input (measured 9x).
- `cpu_slot_swiglu` (CPU, `grouped_cpu`): rows padded per expert to half-blocks, each expert's
  rows in a few runs of static sizes (one loop per size), or near balance most rows in one
  batched [E, C, D] region; chosen per batch on the device. On the GPU such loops are
  launch-bound (7-10x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixtral_jax.models import grouped_pallas
from mixtral_jax.models.grouped_cpu import blocked_slot_swiglu, cpu_slot_swiglu
from mixtral_jax.models.grouped_pallas import BlockLayout, KernelConfig, grouped_matmul
from mixtral_jax.models.rows import combine_slots, move, padded_rows, sorted_layout, take_rows

__all__ = ["batched_swiglu", "combine_slots", "pallas_slot_swiglu", "ragged_slot_swiglu", "slot_swiglu", "take_rows"]


def batched_swiglu(xs: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """xs [E, C, D] -> [E, C, D]: expert e applied to its C rows (one batched matmul per weight)."""
    gate = jnp.einsum("ecd,edh->ech", xs, w_gate)
    up = jnp.einsum("ecd,edh->ech", xs, w_up)
    return jnp.einsum("ech,ehd->ecd", jax.nn.silu(gate) * up, w_down)


def ragged_swiglu(xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array) -> jax.Array:
    gate = jax.lax.ragged_dot(xs, w_gate, group_sizes)
    up = jax.lax.ragged_dot(xs, w_up, group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)


def ragged_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                       w_down: jax.Array) -> jax.Array:
    """slot_swiglu with rows sorted by expert and `ragged_dot` (accelerators)."""
    n, k = expert_ids.shape
    order, group_sizes = sorted_layout(expert_ids, w_gate.shape[0])
    row_of_slot = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=jnp.int32), unique_indices=True)
    return move(x, order, row_of_slot, k, lambda xs: ragged_swiglu(xs, group_sizes, w_gate, w_up, w_down))


def pallas_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                       w_down: jax.Array, block: int = 128, config: KernelConfig = grouped_pallas.DEFAULT,
                       interpret: bool = False) -> jax.Array:
    """slot_swiglu in the same padded-block layout, each matmul one Pallas grouped-matmul kernel
    (`grouped_pallas`, GPU; `interpret` runs it on a CPU)."""
    k = expert_ids.shape[1]
    slot_of_row, row_of_slot, block_expert, n_used, num_blocks, bounds = padded_rows(
        expert_ids, w_gate.shape[0], block)
    used = jnp.arange(num_blocks) < n_used
    layout = BlockLayout(jnp.where(used, block_expert, -1).astype(jnp.int32), bounds, block)

    def compute(xp):
        gate = grouped_matmul(xp, w_gate, layout, config, interpret)
        up = grouped_matmul(xp, w_up, layout, config, interpret)
        return grouped_matmul(jax.nn.silu(gate) * up, w_down, layout, config, interpret)

    return move(x, slot_of_row, row_of_slot, k, compute)


def slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                w_down: jax.Array, padded_buffer: bool = False) -> jax.Array:
    """[N, k, D]: every (token, slot) through its expert, with the backend's grouped matmul
    (decided at trace time). padded_buffer: x is a worst-case-sized buffer whose unused rows
    carry the id num_experts (the expert-parallel receive buffer); on CPU the runs alone then,
    since the fitted layout's capacity would be sized from the buffer, not the routed rows."""
    backend = jax.default_backend()
    if backend == "cpu":
        impl = blocked_slot_swiglu if padded_buffer else cpu_slot_swiglu
    elif backend == "gpu" and grouped_pallas.supported(x.shape[1], w_gate.shape[-1], x.dtype):
        impl = pallas_slot_swiglu
    else:
        impl = ragged_slot_swiglu
    return impl(x, expert_ids, w_gate, w_up, w_down)
