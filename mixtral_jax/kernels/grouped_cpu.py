"""Grouped SwiGLU on CPU: every (token, expert) slot through its expert with static shapes.

XLA:CPU has no grouped matmul (`ragged_dot` becomes one dense matmul per expert over a masked
copy of the input: 9x). So the slots are laid out in rows, each expert's rows computed by
ordinary matmuls of a few static sizes:
- runs: each expert's rows padded to whole half-blocks of h rows; an expert owning n half-blocks
  gets one run of h * 2^j rows per binary digit j set in n, and each level j is one loop with
  a dynamic trip count (`Units`). Few, large matmuls per expert: one layer at 1024 tokens
  (dim 512, hidden 1536, 8 experts, top-2) 1.26-1.35x a dense layer of the routed FLOPs, at 8k
  tokens 1.03x; runs of at most two half-blocks took 1.38x and 1.12x.
- the fitted layout: each expert's first C = 1.125 x mean-load slots in one batched [E, C, D]
  region, the slots past C in runs after it. Near balance it wastes fewer rows than half-block
  padding and needs no loop (1.21x vs 1.26-1.33x at 1024 tokens); with skewed loads the
  overflow runs cost more.
`cpu_slot_swiglu` picks the layout per batch on the device (`prefers_fitted`). Both layouts
share one row table (`slot_of_row`), its size fixed by the half-block padding, and one
custom_vjp (`_rows_swiglu`) whose residuals are the rows' gate and up activations: a plain
lax.cond between the two made autodiff keep both layouts' residuals, which cost the MoE train
step 2.2% even where the runs were always taken. The backward is hand-written so each run's
weight gradients accumulate in place per expert (autodiff of the loop adds a zero-padded
[E, D, H] cotangent per run).
The rows' inputs and outputs are never laid out whole: each run gathers its rows from x (in the
backward also its rows of the slots' cotangent), writes its outputs straight to their slots and
adds its input gradients into the tokens' rows. Copying x into the [rows, D] layout, the outputs
back out of it and the gradients both ways made passes over k x N x D floats that cost about as
much as the matmuls when experts are narrow: one layer of 64 experts top-8 of width dim / 2 (dim
256, forward + backward) takes 0.93x the time without them; with the other changes of that
revision (weight gradients below, kernels/rows.py's combine and sort) 0.81x, from 1.93x to 1.63x
a dense layer of its active FLOPs (2-core CPU, process CPU time).
Figures: one layer forward + backward against a dense layer of the routed FLOPs,
`python -m benchmarks.moe_dispatch` (docs/performance.md).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mixtral_jax.kernels.rows import padded_block_count, padded_rows, sorted_layout, take_rows


def block_size(rows: int, num_experts: int) -> int:
    """b, twice the padding granularity h. XLA:CPU runs [b, D] x [D, H] matmuls below b = 128
    much less efficiently (measured at D = 256: b = 64 costs 1.15-1.3x the time of b = 128),
    and every run reads its expert's weights whole. So: the power of two near rows / (4 E),
    within [128, 256]."""
    target = max(1, rows // (4 * num_experts))
    return int(min(256, max(128, 1 << (target.bit_length() - 1))))


def _silu_parts(gate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """silu(g) and its derivative sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
    sig = jax.nn.sigmoid(gate)
    return gate * sig, sig * (1 + gate * (1 - sig))


class Units(NamedTuple):
    """The runs over rows padded per expert to whole half-blocks of h rows: an expert owning n
    half-blocks gets one run of h * 2^j rows for each binary digit j set in n."""
    row: jax.Array  # [L, E] first row of level j's runs, experts with a run at that level first
    expert: jax.Array  # [L, E]
    count: jax.Array  # [L] runs in use per level


def _units(bounds: jax.Array, half: int, levels: int, first_row: int = 0) -> Units:
    """bounds [E + 1]: expert e owns half-blocks bounds[e] .. bounds[e + 1] - 1 of the rows from
    first_row on; levels: binary digits enough for any expert's half-block count. Within an
    expert the smaller runs come first: level j's run starts after the n mod 2^j half-blocks of
    the levels below it."""
    owned = bounds[1:] - bounds[:-1]
    rows, experts, counts = [], [], []
    for j in range(levels):
        has = (owned >> j) & 1
        expert = jnp.argsort(-has, stable=True).astype(jnp.int32)
        first = bounds[:-1] + (owned & ((1 << j) - 1))
        rows.append((first[expert] * half + first_row).astype(jnp.int32))
        experts.append(expert)
        counts.append(jnp.sum(has))
    return Units(jnp.stack(rows), jnp.stack(experts), jnp.stack(counts).astype(jnp.int32))


def _levels(rows: int, half: int) -> int:
    """Binary digits of the largest half-block count one expert can own."""
    return (-(-rows // half)).bit_length()


class RowLayout(NamedTuple):
    slot_of_row: jax.Array  # [R] the slot each row computes; N * k: a zero padding row
    units: Units  # the runs (after the batched region, if fitted)
    fitted: jax.Array  # bool []: rows [0, E * C) are the batched region, expert e's at [e C, e C + C)


def _blocked_layout(expert_ids: jax.Array, num_experts: int, half: int) -> RowLayout:
    slot_of_row, _, _, _, _, bounds = padded_rows(expert_ids, num_experts, half)
    return RowLayout(slot_of_row, _units(bounds, half, _levels(expert_ids.size, half)), jnp.zeros((), bool))


def _fitted_layout(expert_ids: jax.Array, num_experts: int, capacity: int, half: int) -> RowLayout:
    """Each expert's first `capacity` slots (token order) in the batched region, the rest in runs
    after it. Rows past the shared buffer are cut: `overflow_fits` must hold."""
    n, k = expert_ids.shape
    c, batched = capacity, num_experts * capacity
    flat = expert_ids.reshape(-1)
    order, group_sizes = sorted_layout(expert_ids, num_experts)
    first = jnp.cumsum(group_sizes) - group_sizes  # sorted position of each expert's first slot
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=jnp.int32) - first[flat[order]],
                                                unique_indices=True)  # slot's place in its expert's queue
    fits = rank < c
    place = jnp.where(fits, flat * c + rank, batched)
    slot_of_place = jnp.full((batched,), n * k, jnp.int32).at[place].set(jnp.arange(n * k, dtype=jnp.int32),
                                                                           mode="drop")
    overflow = jnp.where(fits, num_experts, flat).reshape(n, k)  # id E: not in the runs
    over_slot_of_row, _, _, _, _, bounds = padded_rows(overflow, num_experts, half)
    region = over_slot_of_row.shape[0] - batched
    return RowLayout(jnp.concatenate([slot_of_place, over_slot_of_row[:region]]),
                     _units(bounds, half, _levels(n * k, half), first_row=batched), jnp.ones((), bool))


def _tokens(slots: jax.Array, k: int, n: int) -> jax.Array:
    """The token row each slot reads (a padding row's slot, n * k or past it: row n, out of range)."""
    return jnp.where(slots < n * k, slots // k, n)


def _run_loops(x, slot_of_row, units, half, k, w_gate, w_up, w_down, carry, keep_activations: bool):
    n = x.shape[0]
    for j in range(units.row.shape[0]):
        def body(i, carry, first_row=units.row[j], expert=units.expert[j], rows=half << j):
            out, gates, ups = carry
            e, r = expert[i], first_row[i]
            slots = jax.lax.dynamic_slice_in_dim(slot_of_row, r, rows)
            xb = take_rows(x, _tokens(slots, k, n))
            gate, up = xb @ w_gate[e], xb @ w_up[e]
            out = out.at[slots].set(_silu_parts(gate)[0] * up @ w_down[e], mode="drop")
            if keep_activations:  # residuals for the backward pass, [rows, H] each
                gates = jax.lax.dynamic_update_slice_in_dim(gates, gate, r, 0)
                ups = jax.lax.dynamic_update_slice_in_dim(ups, up, r, 0)
            return out, gates, ups

        carry = jax.lax.fori_loop(0, units.count[j], body, carry)  # dynamic trip count: runs in use only
    return carry


def _batched_forward(x, slot_of_row, batched, k, w_gate, w_up, w_down, carry, keep_activations: bool):
    num_experts, (n, d) = w_gate.shape[0], x.shape
    slots = slot_of_row[:batched]
    xs = take_rows(x, _tokens(slots, k, n)).reshape(num_experts, batched // num_experts, d)
    gate, up = jnp.einsum("ecd,edh->ech", xs, w_gate), jnp.einsum("ecd,edh->ech", xs, w_up)
    out, gates, ups = carry
    out = out.at[slots].set(jnp.einsum("ech,ehd->ecd", _silu_parts(gate)[0] * up, w_down).reshape(batched, d),
                            mode="drop")
    if keep_activations:
        gates, ups = gates.at[:batched].set(gate.reshape(batched, -1)), ups.at[:batched].set(up.reshape(batched, -1))
    return out, gates, ups


def _forward(x, slot_of_row, units, fitted, half, batched, k, w_gate, w_up, w_down, keep_activations: bool):
    act_shape = (slot_of_row.shape[0], w_gate.shape[-1]) if keep_activations else (0,)
    # carries typed like x; slots no row computes (ids E, not routed here) stay zero
    zeros = lambda: (jnp.zeros_like(x, shape=(x.shape[0] * k, x.shape[1])), jnp.zeros_like(x, shape=act_shape),
                     jnp.zeros_like(x, shape=act_shape))
    # The batched region first, each branch making the loop's initial carry: a branch that passed
    # a carry through unchanged would copy it.
    carry = jax.lax.cond(fitted, lambda: _batched_forward(x, slot_of_row, batched, k, w_gate, w_up, w_down, zeros(),
                                                          keep_activations), zeros) if batched else zeros()
    return _run_loops(x, slot_of_row, units, half, k, w_gate, w_up, w_down, carry, keep_activations)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _rows_swiglu(x, slot_of_row, units, fitted, w_gate, w_up, w_down, half, batched, k):
    """[N * k, D]: every slot through its expert, the slots laid out in rows as `RowLayout` says.
    Each run gathers its rows from x and writes its outputs to their slots."""
    return _forward(x, slot_of_row, units, fitted, half, batched, k, w_gate, w_up, w_down, keep_activations=False)[0]


def _rows_swiglu_fwd(x, slot_of_row, units, fitted, w_gate, w_up, w_down, half, batched, k):
    out, gates, ups = _forward(x, slot_of_row, units, fitted, half, batched, k, w_gate, w_up, w_down,
                               keep_activations=True)
    return out, (x, slot_of_row, units, fitted, w_gate, w_up, w_down, gates, ups)


def _swiglu_grads(silu, dsilu, up, do, w_down_t):
    """(dgate, dup): the gradients at the gate and up projections' outputs, from dout and w_down^T."""
    dh = do @ w_down_t
    return dh * up * dsilu, dh * silu


# A run's weight gradients a^T b take a transposed copy of a when a has at most this many rows,
# and at most this many elements: the gathered inputs, the activation silu(gate) * up (computed
# inside its copy, in transposed order). See `_weight_grad`.
TRANSPOSED_GRAD_MAX_ROWS, TRANSPOSED_INPUT_MAX_SIZE, TRANSPOSED_ACTIVATION_MAX_SIZE = 512, 2**18, 2**17


def _weight_grad(a: jax.Array, b: jax.Array, max_size: int) -> jax.Array:
    """a^T b in float32 for one run's rows a [rows, X], b [rows, Y]. XLA:CPU runs a dot that
    contracts both operands' leading (row) axis with a slower routine (kernels/matmul.py), and a
    transpose inside the loop with a slow one too. A transposed copy of a (the barrier keeps XLA
    from folding it back into the dot), then a plain dot, measured 8% faster on one layer of 64
    experts top-8 (dim 256, width 128; runs of 64-512 rows) and 4% at dim 512, width 256; runs of
    1024 rows, or an activation of [512, 512] and more, were 2-25% slower that way than the
    contracting dot (2-core CPU, paired rounds, process CPU time)."""
    if a.shape[0] <= TRANSPOSED_GRAD_MAX_ROWS and a.size <= max_size:
        return jnp.dot(jax.lax.optimization_barrier(a.T), b, preferred_element_type=jnp.float32)
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _rows_swiglu_bwd(half, batched, k, res, d_out):
    x, slot_of_row, units, fitted, w_gate, w_up, w_down, gates, ups = res
    f32, (n, d) = jnp.float32, x.shape
    zeros32 = lambda w: jnp.zeros_like(w, dtype=f32)
    # dx accumulates in float32 over each token's k slots (scatter-adds into [N, D])
    zeros = lambda: (jnp.zeros_like(x, dtype=f32), zeros32(w_gate), zeros32(w_up), zeros32(w_down))

    def batched_bwd():  # the loop's initial carry: the batched region's gradients
        e = w_gate.shape[0]
        slots = slot_of_row[:batched]
        tokens = _tokens(slots, k, n)
        xs = take_rows(x, tokens).reshape(e, batched // e, d)
        do = take_rows(d_out, slots).reshape(e, batched // e, d)
        gate, up = (a[:batched].reshape(e, batched // e, -1) for a in (gates, ups))
        silu, dsilu = _silu_parts(gate)
        dgate, dup = _swiglu_grads(silu, dsilu, up, do, w_down.swapaxes(1, 2))
        dxs = jnp.einsum("ech,edh->ecd", dgate, w_gate) + jnp.einsum("ech,edh->ecd", dup, w_up)
        return (jnp.zeros_like(x, dtype=f32).at[tokens].add(dxs.reshape(batched, d).astype(f32), mode="drop"),
                jnp.einsum("ecd,ech->edh", xs, dgate, preferred_element_type=f32),
                jnp.einsum("ecd,ech->edh", xs, dup, preferred_element_type=f32),
                jnp.einsum("ech,ecd->ehd", silu * up, do, preferred_element_type=f32))

    carry = jax.lax.cond(fitted, batched_bwd, zeros) if batched else zeros()
    for j in range(units.row.shape[0]):
        def body(i, carry, first_row=units.row[j], expert=units.expert[j], rows=half << j):
            dx, dwg, dwu, dwd = carry
            e, r = expert[i], first_row[i]
            slots = jax.lax.dynamic_slice_in_dim(slot_of_row, r, rows)
            tokens = _tokens(slots, k, n)
            xb, do = take_rows(x, tokens), take_rows(d_out, slots)
            gate, up = (jax.lax.dynamic_slice_in_dim(a, r, rows) for a in (gates, ups))
            silu, dsilu = _silu_parts(gate)
            dgate, dup = _swiglu_grads(silu, dsilu, up, do, w_down[e].T)
            # Weight gradients accumulate in float32, in place in the loop carry.
            dwd = dwd.at[e].add(_weight_grad(silu * up, do, TRANSPOSED_ACTIVATION_MAX_SIZE))
            dwg = dwg.at[e].add(_weight_grad(xb, dgate, TRANSPOSED_INPUT_MAX_SIZE))
            dwu = dwu.at[e].add(_weight_grad(xb, dup, TRANSPOSED_INPUT_MAX_SIZE))
            dx = dx.at[tokens].add(jnp.dot(dgate, w_gate[e].T, preferred_element_type=f32)
                                   + jnp.dot(dup, w_up[e].T, preferred_element_type=f32), mode="drop")
            return dx, dwg, dwu, dwd

        carry = jax.lax.fori_loop(0, units.count[j], body, carry)

    dx, dwg, dwu, dwd = carry
    return (dx.astype(x.dtype), None, None, None, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype),
            dwd.astype(w_down.dtype))


_rows_swiglu.defvjp(_rows_swiglu_fwd, _rows_swiglu_bwd)


def _slot_outputs(x, layout: RowLayout, expert_ids, w_gate, w_up, w_down, half, batched):
    """[N, k, D] slot outputs of the slots laid out as `layout` says (batched: its region's rows)."""
    n, k = expert_ids.shape
    out = _rows_swiglu(x, layout.slot_of_row, layout.units, layout.fitted, w_gate, w_up, w_down, half, batched, k)
    return out.reshape(n, k, -1)


def _half(block: int) -> int:
    if block % 2:
        raise ValueError(f"block must be even (half-block padding), got {block}")
    return block // 2


def blocked_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                        w_down: jax.Array, block: int | None = None) -> jax.Array:
    """[N, k, D] slot outputs with every expert's rows in runs (no batched region): the layout for
    buffers whose rows are mostly padding (the expert-parallel receive buffer)."""
    half = _half(block or block_size(expert_ids.size, w_gate.shape[0]))
    layout = _blocked_layout(expert_ids, w_gate.shape[0], half)
    return _slot_outputs(x, layout, expert_ids, w_gate, w_up, w_down, half, 0)


CPU_CAPACITY_FACTOR = 1.125  # batched rows per expert over the mean; the rest go to the runs


def cpu_capacity(rows: int, num_experts: int, num_tokens: int) -> int:
    """Rows per expert of the batched region: the mean load times CPU_CAPACITY_FACTOR, rounded up
    to a multiple of 32, at most the token count (no expert can receive more)."""
    return min(num_tokens, 32 * math.ceil(rows / num_experts * CPU_CAPACITY_FACTOR / 32))


# A row of the batched region costs about 0.96x a row of runs (CPU, dim 512, hidden 1536:
# 2304 batched rows 1.285x a dense layer of the routed FLOPs, 2048 rows in whole blocks 1.19x).
BATCHED_ROW_COST = 0.96
# The fitted layout is a candidate only when, at balance, it computes under this share of the
# rows plus half a b-row block per expert: at 16k tokens half-block padding is a small share.
FITTED_MARGIN = 0.9


def prefers_fitted(group_sizes: jax.Array, capacity: int, block: int) -> jax.Array:
    """Whether the fitted layout (E x capacity batched rows, the overflow in whole blocks) costs
    less than every expert's rows in whole blocks. The runs pad to half-blocks, but their small
    runs cost more per row; whole blocks matched the measured winner at balance and under skew."""
    whole_blocks = lambda rows: jnp.sum((rows + block - 1) // block) * block
    fitted = BATCHED_ROW_COST * group_sizes.shape[0] * capacity + whole_blocks(jnp.maximum(group_sizes - capacity, 0))
    return fitted < whole_blocks(group_sizes)


def overflow_fits(group_sizes: jax.Array, capacity: int, half: int, region: int) -> jax.Array:
    """Whether the slots past each expert's capacity, padded to half-blocks, fit in `region` rows
    (the shared buffer's rows after the batched region)."""
    over = jnp.maximum(group_sizes - capacity, 0)
    return jnp.sum((over + half - 1) // half) * half <= region


def laid_out_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                         w_down: jax.Array, fitted: jax.Array, capacity: int, block: int) -> jax.Array:
    """[N, k, D] slot outputs in the fitted layout where `fitted` (a traced bool; the overflow
    must fit, `overflow_fits`), else in runs alone."""
    n, k = expert_ids.shape
    num_experts, half = w_gate.shape[0], _half(block)
    if num_experts * capacity > padded_block_count(n * k, num_experts, half) * half:
        raise ValueError(f"capacity {capacity}: the batched region ({num_experts} x {capacity} rows) exceeds "
                         f"the row buffer of {n * k} slots padded to {half}-row half-blocks")
    layout = jax.lax.cond(fitted, lambda ids: _fitted_layout(ids, num_experts, capacity, half),
                          lambda ids: _blocked_layout(ids, num_experts, half), expert_ids)
    return _slot_outputs(x, layout, expert_ids, w_gate, w_up, w_down, half, num_experts * capacity)


def cpu_slot_swiglu(x: jax.Array, expert_ids: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                    w_down: jax.Array) -> jax.Array:
    """[N, k, D] slot outputs on CPU, in the fitted layout or in runs alone, whichever computes
    fewer (cost-weighted) rows for this batch's loads, chosen on the device. Where the fitted
    layout cannot win clearly even at balance (FITTED_MARGIN), or its batched region would not
    fit the shared buffer, runs alone without a choice."""
    n, k = expert_ids.shape
    num_experts = w_gate.shape[0]
    c, b = cpu_capacity(n * k, num_experts, n), block_size(n * k, num_experts)
    region = padded_block_count(n * k, num_experts, b // 2) * (b // 2) - num_experts * c
    if region < 0 or BATCHED_ROW_COST * num_experts * c > FITTED_MARGIN * (n * k + num_experts * b / 2):
        return blocked_slot_swiglu(x, expert_ids, w_gate, w_up, w_down, block=b)
    sizes = jnp.bincount(expert_ids.reshape(-1), length=num_experts)
    fitted = prefers_fitted(sizes, c, b) & overflow_fits(sizes, c, b // 2, region)
    return laid_out_slot_swiglu(x, expert_ids, w_gate, w_up, w_down, fitted, c, b)
