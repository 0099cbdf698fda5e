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
- `cpu_slot_swiglu` (CPU): per batch, on the device, the cheaper of two layouts:
  - `fitted_slot_swiglu`: each expert's first C = 1.125 x mean-load slots in one batched
    [E, C, D] SwiGLU (12.5% waste at balance), the slots past C in the block loop below
    (measured 1.26x a dense layer of the routed FLOPs at balance, 1024 tokens, dim 512).
  - `blocked_slot_swiglu`: each expert's rows padded to whole half-blocks of b/2 rows, and
    loops over runs of b rows (and one b/2-row tail per expert) each run one SwiGLU with its
    expert's weights (`Units`; 1.41x at balance, 1.38x with loads of 0.3-1.7x the mean, 1.48x
    with a few experts at 2x the mean, where the fitted layout's overflow costs more: 1.57-1.70x).
  The block loop's backward is hand-written (custom_vjp) so weight gradients accumulate in
  place per expert: autodiff of a scan adds a full zero-padded [E, D, H] cotangent every block
  (measured about 1.5x vs 1.1x a dense layer). On the GPU this loop is launch-bound (7-10x).
  Tried and slower on CPU: one loop per expert with its blocks nested inside, a fused [D, 2H]
  gate-up weight, batched matmuls over per-block gathered weights (1.5x), and variable-size
  pieces per expert chosen by lax.switch (no padding, but 1.5-1.7x: autodiff of a switch
  keeps every branch's residuals, and the small ops inside branches fuse poorly).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mixtral_jax.models import grouped_pallas
from mixtral_jax.models.grouped_pallas import BlockLayout, KernelConfig, grouped_matmul


def take_rows(src: jax.Array, index: jax.Array) -> jax.Array:
    """src[index] along rows; out-of-range indices give zero rows (padding, dropped slots)."""
    return jnp.take(src, index, axis=0, mode="fill", fill_value=0)


def combine_slots(per_slot: jax.Array, weights: jax.Array) -> jax.Array:
    """[N, k, D] expert outputs per slot, weights [N, k] -> y [N, D], accumulated in float32."""
    return jnp.sum(per_slot.astype(jnp.float32) * weights.astype(jnp.float32)[..., None], axis=1)


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


def block_size(rows: int, num_experts: int) -> int:
    """Padding wastes under one block per expert (E * b / 2 rows on average), but XLA:CPU runs
    [b, D] x [D, H] matmuls below b = 128 much less efficiently (measured at D = 256: b = 64 costs
    1.15-1.3x the time of b = 128). So: the power of two near rows / (4 E), within [128, 256]."""
    target = max(1, rows // (4 * num_experts))
    return int(min(256, max(128, 1 << (target.bit_length() - 1))))


def _silu_parts(gate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """silu(g) and its derivative sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
    sig = jax.nn.sigmoid(gate)
    return gate * sig, sig * (1 + gate * (1 - sig))


class Units(NamedTuple):
    """The block loop's work list over rows padded per expert to whole half-blocks of h rows:
    an expert owning n half-blocks gets one run of h * 2^j rows for each binary digit j set in
    n, so every expert's rows go through a few large matmuls (one layer at 1024 tokens: 1.30x
    a dense layer of the routed FLOPs at balanced loads, where runs of at most 2h rows took
    1.38x; at 8k tokens 1.03x vs 1.12x). Level j's runs are a loop of its own (static shapes)."""
    row: jax.Array  # [L, E] first row of level j's runs, experts with a run at that level first
    expert: jax.Array  # [L, E]
    count: jax.Array  # [L] runs in use per level


def _units(bounds: jax.Array, half: int, levels: int) -> Units:
    """bounds [E + 1]: expert e owns half-blocks bounds[e] .. bounds[e + 1] - 1; levels: binary
    digits enough for any expert's half-block count. Within an expert the smaller runs come
    first: level j's run starts after the n mod 2^j half-blocks of the levels below it."""
    owned = bounds[1:] - bounds[:-1]
    rows, experts, counts = [], [], []
    for j in range(levels):
        has = (owned >> j) & 1
        expert = jnp.argsort(-has, stable=True).astype(jnp.int32)
        first = bounds[:-1] + (owned & ((1 << j) - 1))
        rows.append((first[expert] * half).astype(jnp.int32))
        experts.append(expert)
        counts.append(jnp.sum(has))
    return Units(jnp.stack(rows), jnp.stack(experts), jnp.stack(counts).astype(jnp.int32))


def _runs(units: Units, half: int):
    """(first rows, experts, count, rows per run) of each level's loop."""
    return [(units.row[j], units.expert[j], units.count[j], half << j) for j in range(units.row.shape[0])]


def _forward(xf, units, half, w_gate, w_up, w_down, keep_activations: bool):
    hidden = w_gate.shape[-1]
    act_shape = (xf.shape[0], hidden) if keep_activations else (0,)
    # carries typed like xf (zeros_like keeps its dtype); rows no run covers stay zero
    carry = (jnp.zeros_like(xf), jnp.zeros_like(xf, shape=act_shape), jnp.zeros_like(xf, shape=act_shape))
    for first_row, expert, count, rows in _runs(units, half):
        def body(i, carry, first_row=first_row, expert=expert, rows=rows):
            out, gates, ups = carry
            e, r = expert[i], first_row[i]
            xb = jax.lax.dynamic_slice_in_dim(xf, r, rows)
            gate, up = xb @ w_gate[e], xb @ w_up[e]
            out = jax.lax.dynamic_update_slice_in_dim(out, _silu_parts(gate)[0] * up @ w_down[e], r, 0)
            if keep_activations:  # residuals for the backward pass, [rows, H] each
                gates = jax.lax.dynamic_update_slice_in_dim(gates, gate, r, 0)
                ups = jax.lax.dynamic_update_slice_in_dim(ups, up, r, 0)
            return out, gates, ups

        carry = jax.lax.fori_loop(0, count, body, carry)  # dynamic trip count: runs in use only
    return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocked(xf, units, w_gate, w_up, w_down, half):
    return _forward(xf, units, half, w_gate, w_up, w_down, keep_activations=False)[0]


def _blocked_fwd(xf, units, w_gate, w_up, w_down, half):
    out, gates, ups = _forward(xf, units, half, w_gate, w_up, w_down, keep_activations=True)
    return out, (xf, units, w_gate, w_up, w_down, gates, ups)


def _blocked_bwd(half, res, d_out):
    xf, units, w_gate, w_up, w_down, gates, ups = res
    f32 = jnp.float32
    zeros32 = lambda w: jnp.zeros_like(w, dtype=f32)
    carry = (jnp.zeros_like(xf), zeros32(w_gate), zeros32(w_up), zeros32(w_down))
    for first_row, expert, count, rows in _runs(units, half):
        def body(i, carry, first_row=first_row, expert=expert, rows=rows):
            dx, dwg, dwu, dwd = carry
            e, r = expert[i], first_row[i]
            xb, gate, up, do = (jax.lax.dynamic_slice_in_dim(a, r, rows) for a in (xf, gates, ups, d_out))
            silu, dsilu = _silu_parts(gate)
            dh = do @ w_down[e].T
            dgate, dup = dh * up * dsilu, dh * silu
            # Weight gradients accumulate in float32, in place in the loop carry.
            dwd = dwd.at[e].add(jnp.dot((silu * up).T, do, preferred_element_type=f32))
            dwg = dwg.at[e].add(jnp.dot(xb.T, dgate, preferred_element_type=f32))
            dwu = dwu.at[e].add(jnp.dot(xb.T, dup, preferred_element_type=f32))
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dgate @ w_gate[e].T + dup @ w_up[e].T, r, 0)
            return dx, dwg, dwu, dwd

        carry = jax.lax.fori_loop(0, count, body, carry)
    dx, dwg, dwu, dwd = carry
    return dx, None, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _block_layout(group_sizes: jax.Array, rows: int, b: int):
    """Padded row of each sorted row, expert of each block, each expert's end block (cumulative;
    the last is the used-block count), and the static block count.

    Static bound: each group wastes less than one block, so at most (M + E (b - 1)) / b blocks.
    """
    num_experts = group_sizes.shape[0]
    num_blocks = (rows + num_experts * (b - 1)) // b
    blocks_per_group = (group_sizes + b - 1) // b
    block_ends = jnp.cumsum(blocks_per_group)
    group_ends = jnp.cumsum(group_sizes)
    row_group = jnp.minimum(jnp.searchsorted(group_ends, jnp.arange(rows), side="right"), num_experts - 1)
    offset = (block_ends - blocks_per_group) * b - (group_ends - group_sizes)  # padded - sorted start
    dest = jnp.arange(rows) + offset[row_group]
    block_expert = jnp.minimum(jnp.searchsorted(block_ends, jnp.arange(num_blocks), side="right"),
                               num_experts - 1).astype(jnp.int32)
    return dest, block_expert, block_ends, num_blocks


def _sorted_layout(expert_ids: jax.Array, num_experts: int):
    """Sort the N * k slots by expert (stable: token order within an expert, deterministic)."""
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted row -> slot
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def _move(x: jax.Array, slot_of_row: jax.Array, row_of_slot: jax.Array, k: int,
          compute: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Gather x into the row layout, compute, gather the rows back per slot -> [N, k, D]."""
    n = x.shape[0]
    token_of_row = jnp.where(slot_of_row < n * k, slot_of_row // k, n)  # padding rows -> zero row
    out = compute(take_rows(x, token_of_row))
    return take_rows(out, row_of_slot).reshape(n, k, -1)


def ragged_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                       w_down: jax.Array) -> jax.Array:
    """slot_swiglu with rows sorted by expert and `ragged_dot` (accelerators)."""
    n, k = expert_ids.shape
    order, group_sizes = _sorted_layout(expert_ids, w_gate.shape[0])
    row_of_slot = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=jnp.int32), unique_indices=True)
    return _move(x, order, row_of_slot, k, lambda xs: ragged_swiglu(xs, group_sizes, w_gate, w_up, w_down))


def _padded_rows(expert_ids: jax.Array, num_experts: int, b: int):
    """The sorted rows with each expert's padded to whole blocks of b (slots whose id is
    num_experts are left out: they get no row and gather zeros): (slot_of_row, row_of_slot,
    block_expert, used blocks, block count, block bounds [E + 1]: expert e owns blocks
    bounds[e] .. bounds[e + 1] - 1)."""
    n, k = expert_ids.shape
    order, group_sizes = _sorted_layout(expert_ids, num_experts)
    dest, block_expert, block_ends, num_blocks = _block_layout(group_sizes, n * k, b)
    # Slots with expert id num_experts (not routed here) sort last: they get no row (out of range).
    dest = jnp.where(jnp.arange(n * k) < jnp.sum(group_sizes), dest, num_blocks * b).astype(jnp.int32)
    row_of_slot = jnp.zeros_like(order).at[order].set(dest, unique_indices=True)
    # padding rows name slot n*k (out of range): they gather zeros and are never gathered back
    slot_of_row = jnp.full((num_blocks * b,), n * k, jnp.int32).at[dest].set(order, mode="drop")
    bounds = jnp.concatenate([jnp.zeros(1, block_ends.dtype), block_ends]).astype(jnp.int32)
    return slot_of_row, row_of_slot, block_expert, block_ends[-1], num_blocks, bounds


def blocked_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                        w_down: jax.Array, block: int | None = None) -> jax.Array:
    """slot_swiglu with each expert's rows padded to whole half-blocks and the block loop (CPU):
    runs of `block` rows and one half-block tail per expert (`Units`)."""
    k = expert_ids.shape[1]
    b = block or block_size(expert_ids.size, w_gate.shape[0])
    if b % 2:
        raise ValueError(f"block must be even (runs of two half-blocks), got {b}")
    half = b // 2
    slot_of_row, row_of_slot, _, _, _, bounds = _padded_rows(expert_ids, w_gate.shape[0], half)
    units = _units(bounds, half, levels=(-(-expert_ids.size // half)).bit_length())
    return _move(x, slot_of_row, row_of_slot, k, lambda xf: _blocked(xf, units, w_gate, w_up, w_down, half))


CPU_CAPACITY_FACTOR = 1.125  # batched rows per expert over the mean; the rest go to the block loop


def cpu_capacity(rows: int, num_experts: int, num_tokens: int) -> int:
    """Rows per expert of the batched part: the mean load times CPU_CAPACITY_FACTOR, rounded up to
    a multiple of 32, at most the token count (no expert can receive more)."""
    return min(num_tokens, 32 * math.ceil(rows / num_experts * CPU_CAPACITY_FACTOR / 32))


def fitted_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                       w_down: jax.Array, capacity: int | None = None, block: int | None = None) -> jax.Array:
    """slot_swiglu on CPU: each expert's first C slots (token order) in one batched [E, C, D]
    SwiGLU, the slots past C (an expert over capacity: none, at balanced loads) in the block loop.
    Nothing is dropped; the batched part wastes the unfilled places (12.5% at balance); the
    block layout alone pads every expert to whole half-blocks (`blocked_slot_swiglu`)."""
    n, k = expert_ids.shape
    num_experts, d = w_gate.shape[0], x.shape[1]
    c = capacity or cpu_capacity(n * k, num_experts, n)
    flat = expert_ids.reshape(-1)
    order, group_sizes = _sorted_layout(expert_ids, num_experts)
    first = jnp.cumsum(group_sizes) - group_sizes  # sorted position of each expert's first slot
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=jnp.int32) - first[flat[order]],
                                                unique_indices=True)  # slot's place in its expert's queue
    fits = rank < c
    place = jnp.where(fits, flat * c + rank, num_experts * c)  # out of range: the block loop's slot
    slot_of_place = jnp.full((num_experts * c,), n * k, jnp.int32).at[place].set(
        jnp.arange(n * k, dtype=jnp.int32), mode="drop")
    batched = _move(x, slot_of_place, place, k, lambda xs: batched_swiglu(
        xs.reshape(num_experts, c, d), w_gate, w_up, w_down).reshape(num_experts * c, d))
    overflow = jnp.where(fits, num_experts, flat).reshape(n, k)
    return batched + blocked_slot_swiglu(x, overflow, w_gate, w_up, w_down, block)


# A row of the batched part costs about 0.96x a row of whole blocks (CPU, dim 512, hidden 1536:
# 2304 batched rows 1.285x a dense layer of the routed FLOPs, 2048 rows in whole blocks 1.19x).
BATCHED_ROW_COST = 0.96
# The fitted candidate is considered only when, at balance, it computes under this share of
# the rows plus half a b-row block per expert. Calibrated on one layer: at 1k tokens (fitted
# 1.26x, block layout 1.41x) it is; at 16k tokens (1.34x with the choice vs 1.15x) it is not.
FITTED_MARGIN = 0.9


def prefers_fitted(group_sizes: jax.Array, capacity: int, block: int) -> jax.Array:
    """Whether the fitted layout (E x capacity batched rows, the overflow in whole blocks) costs
    less than every expert's rows in whole blocks. The block layout pads to half-blocks, but
    its tails run slower per row; whole blocks matched the measured winner at balance and under
    both skews in the module docstring."""
    whole_blocks = lambda rows: jnp.sum((rows + block - 1) // block) * block
    fitted = BATCHED_ROW_COST * group_sizes.shape[0] * capacity + whole_blocks(jnp.maximum(group_sizes - capacity, 0))
    return fitted < whole_blocks(group_sizes)


def cpu_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                    w_down: jax.Array) -> jax.Array:
    """slot_swiglu on CPU: `fitted_slot_swiglu` or `blocked_slot_swiglu`, whichever computes fewer
    (cost-weighted) rows for this batch's expert loads, chosen on the device (lax.cond). Near
    balance the fitted layout wastes half as many rows; with experts far over the mean its
    overflow blocks cost more than the block layout's padding. Where the fitted layout cannot
    win clearly even at balance (FITTED_MARGIN), the block layout is used without a choice."""
    n, k = expert_ids.shape
    num_experts = w_gate.shape[0]
    c, b = cpu_capacity(n * k, num_experts, n), block_size(n * k, num_experts)
    if BATCHED_ROW_COST * num_experts * c > FITTED_MARGIN * (n * k + num_experts * b / 2):
        # Even at balance the fitted layout would not save enough to pay for the conditional
        # (autodiff keeps both branches' residuals: at 16k tokens 1.34x vs 1.15x): large loads
        # per expert, where half a block of padding is a small share.
        return blocked_slot_swiglu(x, expert_ids, w_gate, w_up, w_down, block=b)
    sizes = jnp.bincount(expert_ids.reshape(-1), length=num_experts)
    return jax.lax.cond(prefers_fitted(sizes, c, b),
                        lambda *a: fitted_slot_swiglu(*a, capacity=c, block=b),
                        lambda *a: blocked_slot_swiglu(*a, block=b), x, expert_ids, w_gate, w_up, w_down)


def pallas_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                       w_down: jax.Array, block: int = 128, config: KernelConfig = grouped_pallas.DEFAULT,
                       interpret: bool = False) -> jax.Array:
    """slot_swiglu in the same padded-block layout, each matmul one Pallas grouped-matmul kernel
    (`grouped_pallas`, GPU; `interpret` runs it on a CPU)."""
    k = expert_ids.shape[1]
    slot_of_row, row_of_slot, block_expert, n_used, num_blocks, bounds = _padded_rows(
        expert_ids, w_gate.shape[0], block)
    used = jnp.arange(num_blocks) < n_used
    layout = BlockLayout(jnp.where(used, block_expert, -1).astype(jnp.int32), bounds, block)

    def compute(xp):
        gate = grouped_matmul(xp, w_gate, layout, config, interpret)
        up = grouped_matmul(xp, w_up, layout, config, interpret)
        return grouped_matmul(jax.nn.silu(gate) * up, w_down, layout, config, interpret)

    return _move(x, slot_of_row, row_of_slot, k, compute)


def slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                w_down: jax.Array, padded_buffer: bool = False) -> jax.Array:
    """[N, k, D]: every (token, slot) through its expert, with the backend's grouped matmul
    (decided at trace time). padded_buffer: x is a worst-case-sized buffer whose unused rows
    carry the id num_experts (the expert-parallel receive buffer); on CPU the block layout then,
    since the fitted layout's capacity would be sized from the buffer, not the routed rows."""
    backend = jax.default_backend()
    if backend == "cpu":
        impl = blocked_slot_swiglu if padded_buffer else cpu_slot_swiglu
    elif backend == "gpu" and grouped_pallas.supported(x.shape[1], w_gate.shape[-1], x.dtype):
        impl = pallas_slot_swiglu
    else:
        impl = ragged_slot_swiglu
    return impl(x, expert_ids, w_gate, w_up, w_down)
