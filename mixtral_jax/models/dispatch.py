"""Expert dispatch strategies: how routed tokens reach the stacked SwiGLU experts and come back.

Every dispatcher has the signature
    dispatch(x [N, D], weights [N, k], expert_ids [N, k],
             w_gate [E, D, H], w_up [E, D, H], w_down [E, H, D]) -> y [N, D]
where y[n] = sum_j weights[n, j] * expert_{ids[n, j]}(x[n]). Matmuls run in x's dtype (the caller
casts x and the expert weights); the weighted combination is accumulated in float32.
Looked up by name in `DISPATCHERS` (the `model.moe.dispatch` config key).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Dispatcher = Callable[..., jax.Array]


def dropless(
    x: jax.Array,
    weights: jax.Array,
    expert_ids: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
) -> jax.Array:
    """Sort the N*k (token, expert) assignments by expert and run grouped matmuls (ragged_dot).

    Work is proportional to N*k (no expert sees a token not routed to it) and no token is ever
    dropped, whatever the imbalance: group sizes are data-dependent but the total is static.
    """
    n, k = expert_ids.shape
    num_experts = w_gate.shape[0]
    flat_ids = expert_ids.reshape(-1)
    # Stable sort keeps tokens in order within each expert group (deterministic results).
    order = jnp.argsort(flat_ids, stable=True)
    token_of_slot = order // k  # assignment slot n*k + j belongs to token n
    group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)

    xs = x[token_of_slot]  # [N*k, D], grouped by expert
    gate = jax.lax.ragged_dot(xs, w_gate, group_sizes)
    up = jax.lax.ragged_dot(xs, w_up, group_sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)  # [N*k, D]

    slot_weights = weights.reshape(-1)[order].astype(jnp.float32)
    y = jnp.zeros((n, x.shape[1]), jnp.float32)
    y = y.at[token_of_slot].add(out.astype(jnp.float32) * slot_weights[:, None])  # unsort + combine
    return y.astype(x.dtype)


def dense(
    x: jax.Array,
    weights: jax.Array,
    expert_ids: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
) -> jax.Array:
    """Reference: run every expert on every token, combine with a dense [N, E] weight matrix.

    E/k times the FLOPs of `dropless` and an [N, E, H] intermediate: for tests and tiny models.
    """
    n = x.shape[0]
    num_experts = w_gate.shape[0]
    combine = jnp.zeros((n, num_experts), jnp.float32)
    # .add (not .set) so a repeated expert id would still sum its weights, as dropless does.
    combine = combine.at[jnp.arange(n)[:, None], expert_ids].add(weights.astype(jnp.float32))
    gate = jnp.einsum("nd,edh->neh", x, w_gate)
    up = jnp.einsum("nd,edh->neh", x, w_up)
    out = jnp.einsum("neh,ehd->ned", jax.nn.silu(gate) * up, w_down)
    y = jnp.einsum("ned,ne->nd", out.astype(jnp.float32), combine)
    return y.astype(x.dtype)


DISPATCHERS: dict[str, Dispatcher] = {
    "dropless": dropless,
    "dense": dense,
}
