"""Expert dispatch strategies: how routed tokens reach the stacked SwiGLU experts and come back.

Same math, different cost. Every dispatcher is called as
    dispatch(x [N, D], routing, experts) -> (y [N, D], dropped_fraction [])
with y[n] = sum over the (token n, expert e) pairs that were routed and kept of
weight * expert_e(x[n]). Matmuls run in x's dtype (the caller casts x and the expert weights);
the weighted combination is accumulated in float32.

- `dense`: every expert on every token, combined with the [N, E] matrix: the reference (any router).
- `capacity`: GShard fixed capacity per expert, overflow dropped by router score
  (`routing.capacity_size`).
- `dropless`: sort by expert, grouped matmuls; nothing dropped (`Kernels.grouped`).
`capacity` and `dropless` run under shard_map (all-to-all over the `expert` axis,
`parallel/expert_parallel.py`) when traced under a mesh.
- `expert_choice_dispatch`: for the expert-choice router, whose [E, C] table is already the layout.
Each registers a builder `(MoEConfig, Kernels) -> dispatcher` under its `model.moe.dispatch`
name in the DISPATCHERS registry (config/choices.py).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mixtral_jax.config.choices import DISPATCHERS
from mixtral_jax.kernels.grouped import GroupedSwiGLU, batched_swiglu as stacked_swiglu
from mixtral_jax.kernels.rows import combine_slots, take_rows
from mixtral_jax.models.routing import ExpertChoice, Routing, TokenChoice, capacity_size
from mixtral_jax.parallel.expert_parallel import EXCHANGES, Exchange, dispatch_mesh, expert_parallel_swiglu, \
    padded_exchange


class Experts(NamedTuple):
    w_gate: jax.Array  # [E, D, H]
    w_up: jax.Array  # [E, D, H]
    w_down: jax.Array  # [E, H, D]


Dispatcher = Callable[[jax.Array, Routing, Experts], tuple[jax.Array, jax.Array]]
_ZERO = 0.0  # dropped_fraction of the dispatchers that never drop


def batched_swiglu(xs: jax.Array, experts: Experts) -> jax.Array:
    """xs [E, C, D] -> [E, C, D]: expert e applied to its C rows (one batched matmul per weight)."""
    return stacked_swiglu(xs, *experts)


def dense(x: jax.Array, routing: Routing, experts: Experts) -> tuple[jax.Array, jax.Array]:
    """Reference: every expert on every token, combined with the dense [N, E] weight matrix.

    E/k times the FLOPs of `dropless` and an [N, E, H] intermediate: for tests and tiny models.
    """
    n, num_experts = x.shape[0], experts.w_gate.shape[0]
    combine = routing.to_dense(n, num_experts)
    out = batched_swiglu(jnp.broadcast_to(x, (num_experts, *x.shape)), experts)  # [E, N, D]
    y = jnp.einsum("end,ne->nd", out.astype(jnp.float32), combine)
    return y.astype(x.dtype), jnp.asarray(_ZERO, jnp.float32)


def _capacity_priority(routing: TokenChoice, num_experts: int):
    """Slots sorted into per-expert queues by priority: (sorted expert ids, order: sorted position
    -> flat slot, rank of each sorted slot within its expert's queue)."""
    n, k = routing.expert_ids.shape
    flat_ids = routing.expert_ids.reshape(-1)
    slots = jnp.arange(n * k, dtype=jnp.int32)
    # Priority order: by expert, then weight descending, then slot index (= token-major position).
    sorted_ids, _, order = jax.lax.sort(
        (flat_ids, -jax.lax.stop_gradient(routing.weights.reshape(-1)), slots), num_keys=3)
    counts = jnp.bincount(flat_ids, length=num_experts)
    starts = jnp.cumsum(counts) - counts
    return sorted_ids, order, slots - starts[sorted_ids]


def capacity(
    x: jax.Array, routing: TokenChoice, experts: Experts, *, capacity_factor: float, grouped: GroupedSwiGLU,
    exchange: Exchange = padded_exchange,
) -> tuple[jax.Array, jax.Array]:
    """Fixed capacity C per expert; each expert keeps its C highest-weight slots.

    Drop rule: among the (token, slot) pairs routed to an expert, the ones with the largest combine
    weight are kept; ties go to the earlier token (then the earlier slot). A dropped pair contributes
    nothing: a token losing all its slots passes through the residual unchanged, one losing one of
    two keeps the other's weighted output, not renormalised. Returns the fraction of the N * k
    slots dropped. Cost: one sort of N * k keys, row gathers in and out, batched [E, C, D] matmuls.
    Under a mesh the same keep decision (taken over the global batch) feeds the expert-parallel
    exchange (`exchange`, one of expert_parallel.EXCHANGES), whose devices run `grouped.buffer`
    over what they receive.
    """
    n, k = routing.expert_ids.shape
    num_experts = experts.w_gate.shape[0]
    cap = capacity_size(n, k, num_experts, capacity_factor)
    sorted_ids, order, rank = _capacity_priority(routing, num_experts)
    kept = rank < cap
    dropped = ((n * k - jnp.sum(kept)) / (n * k)).astype(jnp.float32)  # integer count first: exact 0
    mesh = dispatch_mesh(n, num_experts)
    if mesh is not None:
        keep = jnp.zeros((n * k,), bool).at[order].set(kept, unique_indices=True).reshape(n, k)
        y = expert_parallel_swiglu(mesh, x, routing.expert_ids, routing.weights, keep, experts,
                                   grouped=grouped.buffer, max_rows_per_expert=cap, exchange=exchange)
        return y, dropped
    dest = jnp.where(kept, sorted_ids * cap + rank, num_experts * cap)  # out of range = dropped
    slot_dest = jnp.zeros_like(dest).at[order].set(dest, unique_indices=True)  # per flat slot
    # table: for each of the E*C places, which flat slot fills it (n*k = empty)
    source = jnp.full((num_experts * cap,), n * k, jnp.int32).at[dest].set(order, mode="drop")
    token_table = jnp.where(source < n * k, source // k, n)  # empty places read a zero row
    xs = take_rows(x, token_table).reshape(num_experts, cap, -1)
    out = batched_swiglu(xs, experts).reshape(num_experts * cap, -1)
    per_slot = take_rows(out, slot_dest).reshape(n, k, -1)  # dropped slots read zeros
    y = combine_slots(per_slot, routing.weights)
    return y.astype(x.dtype), dropped


def dropless(x: jax.Array, routing: TokenChoice, experts: Experts, *, grouped: GroupedSwiGLU,
             exchange: Exchange = padded_exchange) -> tuple[jax.Array, jax.Array]:
    """Sort the N * k (token, expert) slots by expert once and run grouped matmuls (`grouped`).

    Work is proportional to N * k (no expert sees a token not routed to it) and no token is ever
    dropped, whatever the imbalance: group sizes are data-dependent but the total is static.
    """
    mesh = dispatch_mesh(*x.shape[:1], experts.w_gate.shape[0])
    if mesh is not None:
        keep = jnp.ones(routing.expert_ids.shape, bool)
        return expert_parallel_swiglu(mesh, x, routing.expert_ids, routing.weights, keep, experts,
                                      grouped=grouped.buffer, exchange=exchange), jnp.asarray(_ZERO, jnp.float32)
    y = combine_slots(grouped.tokens(x, routing.expert_ids, *experts), routing.weights)
    return y.astype(x.dtype), jnp.asarray(_ZERO, jnp.float32)


def expert_choice_dispatch(
    x: jax.Array, routing: ExpertChoice, experts: Experts
) -> tuple[jax.Array, jax.Array]:
    """The expert-choice router's [E, C] table is the dispatch layout: gather, batched SwiGLU,
    gate-weighted scatter-add. Nothing is dropped for capacity; `dropped_fraction` reports the
    fraction of tokens no expert chose (they pass through the residual unchanged)."""
    n, d = x.shape
    # Empty places cannot occur (C <= N), so a plain gather and scatter-add suffice here.
    xs = x[routing.token_idx]  # [E, C, D]
    out = batched_swiglu(xs, experts).astype(jnp.float32) * routing.gates[..., None].astype(jnp.float32)
    y = jnp.zeros((n, d), jnp.float32).at[routing.token_idx.reshape(-1)].add(out.reshape(-1, d))
    picks = jnp.zeros((n,), jnp.int32).at[routing.token_idx.reshape(-1)].add(1)
    return y.astype(x.dtype), jnp.mean(picks == 0).astype(jnp.float32)


# name -> builder from the config and the kernels. Token-choice routers use these; the
# expert-choice router is paired with `expert_choice_dispatch` (or `dense`) by MoEBlock.
DISPATCHERS.register("dense", lambda moe, kernels: dense)
DISPATCHERS.register("capacity", lambda moe, kernels: functools.partial(
    capacity, capacity_factor=moe.capacity_factor, grouped=kernels.grouped, exchange=EXCHANGES[kernels.exchange]))
DISPATCHERS.register("dropless", lambda moe, kernels: functools.partial(
    dropless, grouped=kernels.grouped, exchange=EXCHANGES[kernels.exchange]))
