"""Sparse mixture-of-experts feed-forward block (Mixtral): router + stacked SwiGLU experts."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.models.dispatch import DISPATCHERS
from mixtral_jax.models.layers import INIT_STD, as_dtype, make_param
from mixtral_jax.models.routing import ROUTERS, load_balancing_loss, router_stats, router_z_loss

STAT_KEYS = ("aux_loss", "z_loss", "expert_load", "router_entropy", "dropped_fraction")


class MoEBlock(nnx.Module):
    """x [B, T, dim] -> (y [B, T, dim], stats).

    Parameters: router [dim, E] (stored in moe.router_dtype, applied in float32), experts
    w_gate / w_up [E, dim, hidden] and w_down [E, hidden, dim]. stats holds the unscaled
    `aux_loss` (Switch), `z_loss`, `expert_load` [E], `router_entropy` and `dropped_fraction`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        moe = cfg.moe
        if moe.router not in ROUTERS:
            raise NotImplementedError(
                f"model.moe.router '{moe.router}' is not implemented yet (available: {', '.join(ROUTERS)})")
        if moe.dispatch not in DISPATCHERS:
            raise NotImplementedError(
                f"model.moe.dispatch '{moe.dispatch}' is not implemented yet "
                f"(available: {', '.join(DISPATCHERS)})")
        # The only place routing strategy is chosen; __call__ just uses these.
        self.route = ROUTERS[moe.router]
        self.dispatch = DISPATCHERS[moe.dispatch]
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.dtype = as_dtype(cfg.dtype)
        pdt = as_dtype(cfg.param_dtype)
        e, d, h = moe.num_experts, cfg.dim, cfg.hidden_dim
        out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
        # Router replicated over the expert axis: every device needs all E logits for top-k.
        self.router = make_param(rngs, (d, e), ("embed", None), as_dtype(moe.router_dtype))
        self.w_gate = make_param(rngs, (e, d, h), ("expert", "embed", "mlp"), pdt)
        self.w_up = make_param(rngs, (e, d, h), ("expert", "embed", "mlp"), pdt)
        self.w_down = make_param(rngs, (e, h, d), ("expert", "mlp", "embed"), pdt, out_std)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        logits = tokens.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        probs = jax.nn.softmax(logits, axis=-1)
        weights, expert_ids = self.route(logits, self.top_k)

        dt = self.dtype
        y = self.dispatch(
            tokens.astype(dt),
            weights,
            expert_ids,
            self.w_gate[...].astype(dt),
            self.w_up[...].astype(dt),
            self.w_down[...].astype(dt),
        )
        stats = {
            "aux_loss": load_balancing_loss(probs, expert_ids, self.num_experts),
            "z_loss": router_z_loss(logits),
            **router_stats(probs, expert_ids, self.num_experts),
            # Neither available dispatcher drops tokens; a capacity dispatcher will report its own.
            "dropped_fraction": jnp.zeros((), jnp.float32),
        }
        return y.reshape(b, t, d), stats
