"""Router math as small pure functions, plus the balancing losses and routing statistics.

A router maps float32 logits [N, E] to (combine weights [N, k] float32, expert ids [N, k] int32).
Routers are looked up by name in `ROUTERS` (the `model.moe.router` config key). Routers that
need more than (logits, k) -- a selection bias for loss-free balancing, an rng for jitter --
take those as keyword-only arguments, so every router is callable as `router(logits, k, **extra)`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Router = Callable[..., tuple[jax.Array, jax.Array]]


def topk_softmax(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Mixtral routing: take the top-k logits per token, softmax over just those k.

    Identical to softmax over all experts, keep the top k, renormalise.
    """
    top_logits, expert_ids = jax.lax.top_k(logits.astype(jnp.float32), k)
    return jax.nn.softmax(top_logits, axis=-1), expert_ids.astype(jnp.int32)


ROUTERS: dict[str, Router] = {
    "topk_softmax": topk_softmax,
}


def expert_fractions(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """f_i: fraction of all N*k token-slots assigned to expert i; [E], sums to 1."""
    counts = jnp.zeros((num_experts,), jnp.float32).at[expert_ids.reshape(-1)].add(1.0)
    return counts / expert_ids.size


def load_balancing_loss(router_probs: jax.Array, expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """Switch Transformer loss E * sum_i f_i * P_i; 1.0 at perfect balance.

    f_i (from the discrete assignment) carries no gradient; it flows through P_i, the mean
    full-softmax probability of expert i, pushing probability away from overloaded experts.
    """
    f = jax.lax.stop_gradient(expert_fractions(expert_ids, num_experts))
    p = jnp.mean(router_probs.astype(jnp.float32), axis=0)
    return num_experts * jnp.sum(f * p)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE z-loss mean(logsumexp(logits)^2): keeps router logits small for float stability."""
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def router_stats(router_probs: jax.Array, expert_ids: jax.Array, num_experts: int) -> dict[str, jax.Array]:
    """Diagnostics (no gradient): per-expert load fractions [E] and mean full-softmax entropy."""
    probs = jax.lax.stop_gradient(router_probs.astype(jnp.float32))
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), axis=-1)
    return {
        "expert_load": expert_fractions(expert_ids, num_experts),
        "router_entropy": jnp.mean(entropy),
    }
