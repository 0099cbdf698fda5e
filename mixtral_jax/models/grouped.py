"""Grouped SwiGLU for dropless dispatch: rows sorted by expert, one expert's weights per group.

    grouped_swiglu(xs [M, D], group_sizes [E], w_gate [E, D, H], w_up [E, D, H], w_down [E, H, D])
        -> [M, D], row r of group e = SwiGLU_e(xs[r])

Two implementations, chosen by backend in `grouped_swiglu`:
- `ragged_swiglu`: `jax.lax.ragged_dot`, which GPU and TPU lower to a native grouped matmul.
  On CPU, JAX lowers ragged_dot to a dense matmul over a masked [E, M, D] copy of the input:
  E times the work (measured 9x a dense layer of the same active FLOPs at E=8, k=2).
- `blocked_swiglu` (CPU): each group is padded to a multiple of a block size b, and a loop runs
  one [b, D] x [D, H] SwiGLU per used block with that block's expert weights. The backward pass
  is hand-written (custom_vjp) so weight gradients accumulate in place per expert; autodiff of a
  scan would add a full [E, D, H] zero-padded cotangent every block (measured 1.4x vs 1.1x).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ragged_swiglu(xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                  w_down: jax.Array) -> jax.Array:
    gate = jax.lax.ragged_dot(xs, w_gate, group_sizes)
    up = jax.lax.ragged_dot(xs, w_up, group_sizes)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)


def block_size(rows: int, num_experts: int) -> int:
    """Padding wastes under one block per expert (E * b / 2 rows on average), so b scales with
    the rows per expert: the power of two near rows / (4 E), kept within [16, 256] so each block
    matmul stays efficient and the loop short."""
    target = max(1, rows // (4 * num_experts))
    return int(min(256, max(16, 1 << (target.bit_length() - 1))))


def _silu_parts(gate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """silu(g) and its derivative sigmoid(g) * (1 + g * (1 - sigmoid(g)))."""
    sig = jax.nn.sigmoid(gate)
    return gate * sig, sig * (1 + gate * (1 - sig))


def _forward(xp, block_expert, n_used, w_gate, w_up, w_down, keep_activations: bool):
    num_blocks, b, _ = xp.shape
    hidden = w_gate.shape[-1]

    def body(i, carry):
        out, gates, ups = carry
        e, xb = block_expert[i], xp[i]
        gate, up = xb @ w_gate[e], xb @ w_up[e]
        out = out.at[i].set(_silu_parts(gate)[0] * up @ w_down[e])
        if keep_activations:  # residuals for the backward pass, [num_blocks, b, H] each
            gates, ups = gates.at[i].set(gate), ups.at[i].set(up)
        return out, gates, ups

    act_shape = (num_blocks, b, hidden) if keep_activations else (0,)
    init = (jnp.zeros_like(xp), jnp.zeros(act_shape, xp.dtype), jnp.zeros(act_shape, xp.dtype))
    # Dynamic trip count: blocks past n_used are padding and stay zero.
    return jax.lax.fori_loop(0, n_used, body, init)


@jax.custom_vjp
def _blocked(xp, block_expert, n_used, w_gate, w_up, w_down):
    return _forward(xp, block_expert, n_used, w_gate, w_up, w_down, keep_activations=False)[0]


def _blocked_fwd(xp, block_expert, n_used, w_gate, w_up, w_down):
    out, gates, ups = _forward(xp, block_expert, n_used, w_gate, w_up, w_down, keep_activations=True)
    return out, (xp, block_expert, n_used, w_gate, w_up, w_down, gates, ups)


def _blocked_bwd(res, d_out):
    xp, block_expert, n_used, w_gate, w_up, w_down, gates, ups = res
    f32 = jnp.float32

    def body(i, carry):
        dx, dwg, dwu, dwd = carry
        e, xb, gate, up, do = block_expert[i], xp[i], gates[i], ups[i], d_out[i]
        silu, dsilu = _silu_parts(gate)
        dh = do @ w_down[e].T
        dgate, dup = dh * up * dsilu, dh * silu
        # Weight gradients accumulate in float32, in place in the loop carry.
        dwd = dwd.at[e].add(jnp.dot((silu * up).T, do, preferred_element_type=f32))
        dwg = dwg.at[e].add(jnp.dot(xb.T, dgate, preferred_element_type=f32))
        dwu = dwu.at[e].add(jnp.dot(xb.T, dup, preferred_element_type=f32))
        dx = dx.at[i].set(dgate @ w_gate[e].T + dup @ w_up[e].T)
        return dx, dwg, dwu, dwd

    zeros32 = lambda w: jnp.zeros(w.shape, f32)
    init = (jnp.zeros_like(xp), zeros32(w_gate), zeros32(w_up), zeros32(w_down))
    dx, dwg, dwu, dwd = jax.lax.fori_loop(0, n_used, body, init)
    return dx, None, None, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype), dwd.astype(w_down.dtype)


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def blocked_swiglu(xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, block: int | None = None) -> jax.Array:
    """Same contract as `ragged_swiglu`; pads each group to whole blocks (see module docstring)."""
    rows, d = xs.shape
    num_experts = w_gate.shape[0]
    b = block or block_size(rows, num_experts)
    # Static bound: each group wastes less than one block, so <= (M + E (b - 1)) / b blocks.
    num_blocks = (rows + num_experts * (b - 1)) // b
    blocks_per_group = (group_sizes + b - 1) // b
    block_ends = jnp.cumsum(blocks_per_group)
    group_starts = jnp.cumsum(group_sizes) - group_sizes
    padded_starts = (block_ends - blocks_per_group) * b
    row_group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows), side="right")
    row_group = jnp.minimum(row_group, num_experts - 1)
    dest = padded_starts[row_group] + jnp.arange(rows) - group_starts[row_group]  # unique
    xp = jnp.zeros((num_blocks * b, d), xs.dtype).at[dest].set(xs, unique_indices=True)
    block_expert = jnp.minimum(jnp.searchsorted(block_ends, jnp.arange(num_blocks), side="right"),
                               num_experts - 1).astype(jnp.int32)
    out = _blocked(xp.reshape(num_blocks, b, d), block_expert, block_ends[-1], w_gate, w_up, w_down)
    return out.reshape(num_blocks * b, d).at[dest].get(unique_indices=True)


def grouped_swiglu(xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array) -> jax.Array:
    """The grouped SwiGLU for the current backend (decided at trace time)."""
    impl = blocked_swiglu if jax.default_backend() == "cpu" else ragged_swiglu
    return impl(xs, group_sizes, w_gate, w_up, w_down)
