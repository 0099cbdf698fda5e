"""Grouped SwiGLU for dropless dispatch: one interface, one implementation per backend.

    grouped.tokens(x [N, D], expert_ids [N, k], w_gate [E, D, H], w_up [E, D, H], w_down [E, H, D])
        -> [N, k, D], out[n, j] = SwiGLU_{expert_ids[n, j]}(x[n])

Each implementation sorts the N * k slots by expert once, lays the rows out for its grouped
matmul, gathers x into that layout and gathers the results back per slot (on CPU each run
gathers its own rows and writes its results to their slots). `grouped.buffer` is
the same function for a worst-case-sized buffer whose unused rows carry the id E (the
expert-parallel receive buffer). Which one a model runs is `Kernels.grouped` (backend.py):
- `PALLAS` (GPU, 16-bit compute; `ragged_dot` for shapes or dtypes the kernel does not take):
  rows padded per expert to whole blocks, each matmul one Pallas (Triton) kernel that reads its
  block's expert from a table (`grouped_pallas`). XLA's GPU `ragged_dot` expands into one dense
  matmul per expert: 7.7x a dense layer of equal FLOPs on an H100, jax 0.11.2
  (`python -m benchmarks.grouped_matmul`).
- `RAGGED` (TPU): rows sorted by expert, `jax.lax.ragged_dot`, which XLA lowers to its
  ragged-dot instruction on TPU. On CPU, JAX lowers it to one dense matmul over a masked
  [E, M, D] copy of the input (9x), so CPU never takes it; tests use it as the reference.
- `TOKAMAX` (`model.grouped_kernel: tokamax`; the `gpu` extra): the same sorted rows through
  `tokamax.ragged_dot`, which takes the first of its implementations that accepts the call
  (Mosaic GPU on Hopper, Triton, Mosaic TPU, else XLA's `ragged_dot`). On CPU that is XLA's,
  so CPU runs it only in the tests, against `jax.lax.ragged_dot`.
- `CPU` (`grouped_cpu`): rows padded per expert to half-blocks, each expert's rows in a few runs
  of static sizes, or near balance most rows in one batched [E, C, D] region, chosen per batch
  on the device. The buffer form takes the runs alone: the batched region would be sized from
  the buffer, not from the routed rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from mixtral_jax.kernels import grouped_pallas
from mixtral_jax.kernels.grouped_cpu import blocked_slot_swiglu, cpu_slot_swiglu
from mixtral_jax.kernels.grouped_pallas import BlockLayout, KernelConfig, grouped_matmul
from mixtral_jax.kernels.rows import move, padded_rows, sorted_layout

SlotSwiGLU = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclass(frozen=True)
class GroupedSwiGLU:
    """A grouped-SwiGLU implementation: `tokens` for a batch's routed slots, `buffer` for a
    worst-case-sized buffer whose unused rows carry the id E."""

    name: str
    tokens: SlotSwiGLU
    buffer: SlotSwiGLU


def batched_swiglu(xs: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """xs [E, C, D] -> [E, C, D]: expert e applied to its C rows (one batched matmul per weight)."""
    gate = jnp.einsum("ecd,edh->ech", xs, w_gate)
    up = jnp.einsum("ecd,edh->ech", xs, w_up)
    return jnp.einsum("ech,ehd->ecd", jax.nn.silu(gate) * up, w_down)


RaggedDot = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x [M, K], w [E, K, N], sizes [E]) -> [M, N]


def ragged_swiglu(xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array, dot: RaggedDot = jax.lax.ragged_dot) -> jax.Array:
    gate = dot(xs, w_gate, group_sizes)
    up = dot(xs, w_up, group_sizes)
    return dot(jax.nn.silu(gate) * up, w_down, group_sizes)


def ragged_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                       w_down: jax.Array, dot: RaggedDot = jax.lax.ragged_dot) -> jax.Array:
    """Slot outputs [N, k, D] with rows sorted by expert and a ragged dot (`jax.lax.ragged_dot`:
    TPU, and the tests' reference). Rows past the groups (buffer slots with id E) are zeroed:
    a kernel other than XLA's need not write them, and they travel back through the exchange."""
    n, k = expert_ids.shape
    order, group_sizes = sorted_layout(expert_ids, w_gate.shape[0])
    row_of_slot = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=jnp.int32), unique_indices=True)

    def compute(xs):
        out = ragged_swiglu(xs, group_sizes, w_gate, w_up, w_down, dot)
        if dot is jax.lax.ragged_dot:  # XLA's writes zeros there itself
            return out
        return jnp.where((jnp.arange(n * k) < jnp.sum(group_sizes))[:, None], out, 0)

    return move(x, order, row_of_slot, k, compute)


def import_tokamax():
    """tokamax, imported when first asked for (it is an optional extra). It reads its options
    from absl flags and, when nothing has parsed them, parses sys.argv itself, which fails on
    any command line of ours: so the flags are marked parsed first, at their defaults."""
    from absl import flags
    import tokamax

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def tokamax_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                        w_down: jax.Array, implementation: str | None = None) -> jax.Array:
    """`ragged_slot_swiglu` through `tokamax.ragged_dot` (implementation None: tokamax's own
    order of preference: Mosaic, Triton, XLA)."""
    tokamax = import_tokamax()
    dot = functools.partial(tokamax.ragged_dot, implementation=implementation)
    return ragged_slot_swiglu(x, expert_ids, w_gate, w_up, w_down, dot=dot)


def pallas_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                       w_down: jax.Array, block: int = 128, config: KernelConfig = grouped_pallas.DEFAULT,
                       interpret: bool = False) -> jax.Array:
    """Slot outputs [N, k, D] with rows padded per expert to whole blocks, each matmul one Pallas
    grouped-matmul kernel (`grouped_pallas`, GPU; `interpret` runs it on a CPU)."""
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


def gpu_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                    w_down: jax.Array) -> jax.Array:
    """The Pallas kernels where they take these shapes and this dtype, else `ragged_dot`."""
    if grouped_pallas.supported(x.shape[1], w_gate.shape[-1], x.dtype):
        return pallas_slot_swiglu(x, expert_ids, w_gate, w_up, w_down)
    return ragged_slot_swiglu(x, expert_ids, w_gate, w_up, w_down)


CPU = GroupedSwiGLU("cpu", tokens=cpu_slot_swiglu, buffer=blocked_slot_swiglu)
PALLAS = GroupedSwiGLU("pallas", tokens=gpu_slot_swiglu, buffer=gpu_slot_swiglu)
RAGGED = GroupedSwiGLU("ragged_dot", tokens=ragged_slot_swiglu, buffer=ragged_slot_swiglu)
TOKAMAX = GroupedSwiGLU("tokamax", tokens=tokamax_slot_swiglu, buffer=tokamax_slot_swiglu)
_interpreted = functools.partial(pallas_slot_swiglu, interpret=True)
# The Pallas kernels run by Pallas' interpreter, any dtype: for tests on a CPU.
PALLAS_INTERPRETED = GroupedSwiGLU("pallas", tokens=_interpreted, buffer=_interpreted)
