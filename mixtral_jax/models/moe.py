"""Sparse mixture-of-experts feed-forward block: router + stacked SwiGLU experts.

Strategies (router, dispatcher, aux-loss grouping) are looked up once, in MoEBlock.__init__,
from the registries of config/choices.py (implemented in routing.py and dispatch.py); __call__
only calls them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.config.choices import AUX_LOSS_SCOPES, DISPATCHERS, ROUTERS
from mixtral_jax.kernels.backend import Kernels
from mixtral_jax.models.dispatch import Experts, dense, expert_choice_dispatch
from mixtral_jax.models.layers import INIT_STD, MLP, as_dtype, make_param
from mixtral_jax.models.routing import (
    RouterBias,
    TokenChoice,
    balance_probabilities,
    jitter,
    load_balancing_loss,
    router_stats,
    router_z_loss,
    update_router_bias,
)

STAT_KEYS = ("aux_loss", "z_loss", "expert_load", "router_entropy", "dropped_fraction")


class MoEBlock(nnx.Module):
    """x [B, T, dim] -> (y [B, T, dim], stats).

    Parameters: router [dim, E] (stored and applied in moe.router_dtype; scores in float32),
    experts w_gate / w_up [E, dim, h] and w_down [E, h, dim] with h = moe.expert_hidden_dim
    (default model.hidden_dim). With shared experts, `shared`, one SwiGLU MLP of their summed
    width that every token passes through (S experts of width w side by side compute exactly
    one of width S * w), and with moe.shared_gate its `shared_gate` [dim, 1]: the shared output
    is scaled by sigmoid(x . shared_gate) (Qwen2-MoE). With moe.bias_update_rate > 0 or
    moe.selection_bias also `router_bias`, a RouterBias [E] (zeros; used for top-k selection
    only; see routing.update_router_bias).

    stats: `aux_loss` (unscaled load-balancing loss, scope moe.aux_loss_scope), `z_loss`,
    `expert_load` [E] (share of routed token-slots per expert, counted before capacity drops),
    `router_entropy`, `dropped_fraction` (share of routed token-slots the dispatcher dropped:
    0 for dense / dropless; for expert choice, the share of tokens no expert picked).

    router = expert_choice: every expert takes C = ceil(N * capacity_factor / E) tokens of the whole
    batch (not causal). It runs its own gather dispatch at that fixed capacity, whatever
    moe.dispatch says, except `dense`, which selects the dense reference. Its f in the aux loss is
    uniform by construction, so the batch-scope loss is 1 with zero gradient.
    """

    def __init__(self, cfg: ModelConfig, *, kernels: Kernels | None = None, rngs: nnx.Rngs):
        moe = cfg.moe
        # The config's kernel choices apply here too, so they hold for MoE blocks built alone.
        kernels = (kernels or Kernels.for_backend()).with_choices(cfg.grouped_kernel, cfg.fp8)
        # The only place strategies are chosen; __call__ just uses these.
        self.route = ROUTERS.get(moe.router)(moe)
        if moe.router == "expert_choice":
            self.dispatch = dense if moe.dispatch == "dense" else expert_choice_dispatch
        else:
            self.dispatch = DISPATCHERS.get(moe.dispatch)(moe, kernels)
        self.aux_groups = AUX_LOSS_SCOPES.get(moe.aux_loss_scope)
        self.balance_probs = balance_probabilities(moe.router)
        # The router's scores stay out of FP8: top-k selection flips on small errors in them.
        self.matmul = kernels.replace(fp8=False).matmul
        self.expert_inputs = kernels.expert_inputs  # FP8 rounding of the expert matmuls' inputs, or none
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.jitter = moe.jitter
        self.dtype = as_dtype(cfg.dtype)
        self.router_dtype = as_dtype(moe.router_dtype)
        pdt = as_dtype(cfg.param_dtype)
        e, d, h = moe.num_experts, cfg.dim, cfg.expert_width
        out_std = INIT_STD / math.sqrt(2 * cfg.n_layers)
        # Router replicated over the expert axis: every device needs all E logits for top-k.
        self.router = make_param(rngs, (d, e), ("embed", None), self.router_dtype)
        self.w_gate = make_param(rngs, (e, d, h), ("expert", "embed", "mlp"), pdt)
        self.w_up = make_param(rngs, (e, d, h), ("expert", "embed", "mlp"), pdt)
        self.w_down = make_param(rngs, (e, h, d), ("expert", "mlp", "embed"), pdt, out_std)
        self.router_bias = (RouterBias(jnp.zeros((e,), jnp.float32))
                            if moe.bias_update_rate > 0 or moe.selection_bias else None)
        self.shared = (MLP(d, cfg.shared_width, dtype=cfg.dtype, param_dtype=pdt, out_std=out_std, kernels=kernels,
                           rngs=rngs) if cfg.shared_width else None)
        self.shared_gate = make_param(rngs, (d, 1), ("embed", None), pdt) if moe.shared_gate else None

    def __call__(
        self, x: jax.Array, router_rng: jax.Array | None = None, capture_routing: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """router_rng: key for router jitter (training); None (eval) = no noise.
        capture_routing: also return `top_experts` [B, T, k], each token's chosen experts in
        score order (for expert choice, its k highest-probability experts), for analysis."""
        b, t, d = x.shape
        n = b * t
        tokens = x.reshape(n, d)
        router_in = tokens
        if router_rng is not None and self.jitter > 0:
            router_in = jitter(tokens, router_rng, self.jitter)
        rdt = self.router_dtype
        logits = self.matmul(router_in.astype(rdt), self.router[...].astype(rdt)).astype(jnp.float32)
        probs = self.balance_probs(logits)
        bias = self.router_bias[...] if self.router_bias is not None else None
        routing = self.route(logits, bias)

        dt = self.dtype
        expert_in, *weights = self.expert_inputs(tokens.astype(dt), self.w_gate[...].astype(dt),
                                                 self.w_up[...].astype(dt), self.w_down[...].astype(dt))
        y, dropped = self.dispatch(expert_in, routing, Experts(*weights))
        if self.shared is not None:
            y = y + self._shared(tokens.astype(dt)).astype(y.dtype)

        assigned = routing.to_dense(n, self.num_experts, jnp.ones_like(routing[0]))  # [N, E] 0/1
        groups = self.aux_groups(b, t)
        stats = {
            "aux_loss": load_balancing_loss(probs.reshape(*groups, -1), assigned.reshape(*groups, -1)),
            "z_loss": router_z_loss(logits),
            **router_stats(probs, assigned),
            "dropped_fraction": dropped,
        }
        if capture_routing:
            ids = routing.expert_ids if isinstance(routing, TokenChoice) else jax.lax.top_k(probs, self.top_k)[1]
            stats["top_experts"] = ids.reshape(b, t, -1)
        return y.reshape(b, t, d), stats


    def _shared(self, tokens: jax.Array) -> jax.Array:
        """The shared experts' output for token rows [N, dim], gated per token when configured."""
        out = self.shared(tokens)
        if self.shared_gate is None:
            return out
        gate = self.matmul(tokens, self.shared_gate[...].astype(tokens.dtype), out_dtype=jnp.float32)
        return out * jax.nn.sigmoid(gate).astype(out.dtype)


def update_router_biases(model_state: nnx.State, expert_load: jax.Array, rate: float,
                         recenter: bool = False) -> nnx.State:
    """Apply `update_router_bias` to the RouterBias leaves of a model state (or nnx.state(model)).

    In a Transformer the one RouterBias is blocks/ffn/router_bias, stacked [sparse layers, E],
    matching aux["expert_load"] [sparse layers, E]. Other variables are returned unchanged.
    """
    def step(var):
        if isinstance(var, RouterBias):
            return var.replace(update_router_bias(var[...], expert_load, rate, recenter))
        return var

    return jax.tree.map(step, model_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
