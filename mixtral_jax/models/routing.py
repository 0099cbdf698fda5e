"""Routers (small pure functions), the balancing losses, routing statistics and the
loss-free-balancing bias.

A router maps float32 logits [N, E] (N = batch * seq tokens) to a routing decision:
- token choice (`TokenChoice`): each token picks k experts -> weights [N, k], expert_ids [N, k];
- expert choice (`ExpertChoice`): each expert picks C tokens -> gates [E, C], token_idx [E, C].
Both expose `to_dense(N, E)`, the [N, E] combine matrix, which the dense reference dispatcher
and the statistics use, so nothing downstream needs to know which kind it got.
Each router registers a builder `(MoEConfig) -> router(logits, bias)` under its
`model.moe.router` name in the ROUTERS registry (config/choices.py).

Ties: `lax.top_k` returns the lowest index first among equal values, so a tie between experts
goes to the lowest expert id (token choice) and a tie between tokens to the lowest token index
(expert choice). The tests check this.

Load-balancing loss: the value each framework reports at perfect balance
- here: per layer E * sum_i f_i * P_i, with f_i the fraction of the layer's routed token-slots
  (N * k for token choice, counted before any capacity drop) on expert i (sum f = 1) and P_i the
  mean full-softmax probability of expert i. 1.0 at perfect balance for every k. The Transformer
  reports the mean over layers, so also 1.0. `aux_loss_scope: sequence` computes f and P per
  batch row and averages the per-row losses: also 1.0 at balance.
- Hugging Face transformers 5.24.0, `load_balancing_loss_func` in models/mixtral/modeling_mixtral.py:
  sums the top-k assignment counts and the softmax probabilities over
  ALL layers (equivalent to concatenating every layer's [B*T, E] logits), divides both by
  layers * tokens, returns E * sum_i f_i * P_i where this f sums to k. At perfect balance it is
  top_k (2.0 for Mixtral), and for a single layer exactly top_k times our value. Across layers it
  pools before multiplying (product of layer means, not mean of layer products), so in general it
  is not top_k times our layer mean; the two agree (up to k) when every layer routes alike.
- Switch Transformer (Fedus et al. 2021, eq. 4, from the formula): N * sum_i f_i * P_i with top-1
  routing, the same as ours at k = 1, hence 1.0 at balance.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import MoEConfig
from mixtral_jax.config.choices import AUX_LOSS_SCOPES, ROUTERS


class RouterBias(nnx.Variable):
    """Loss-free balancing bias [E] per layer: not a Param (no gradient, no optimizer state),
    but part of the model state, so it is checkpointed with the weights."""


class TokenChoice(NamedTuple):
    weights: jax.Array  # [N, k] float32 combine weights
    expert_ids: jax.Array  # [N, k] int32, distinct per token

    def to_dense(self, num_tokens: int, num_experts: int, values: jax.Array | None = None) -> jax.Array:
        """[N, E] matrix holding `values` (default: the weights) at the chosen (token, expert)."""
        values = self.weights if values is None else values
        rows = jnp.arange(num_tokens)[:, None]
        return jnp.zeros((num_tokens, num_experts), jnp.float32).at[rows, self.expert_ids].add(values)


class ExpertChoice(NamedTuple):
    gates: jax.Array  # [E, C] float32: the chosen token's softmax probability for this expert
    token_idx: jax.Array  # [E, C] int32, distinct per expert

    def to_dense(self, num_tokens: int, num_experts: int, values: jax.Array | None = None) -> jax.Array:
        values = self.gates if values is None else values
        cols = jnp.arange(num_experts)[:, None]
        return jnp.zeros((num_tokens, num_experts), jnp.float32).at[self.token_idx, cols].add(values)


Routing = Union[TokenChoice, ExpertChoice]
Router = Callable[[jax.Array, Union[jax.Array, None]], Routing]  # (logits [N, E], bias [E] | None)


def _select(scores: jax.Array, k: int, bias: jax.Array | None, n_groups: int = 1,
            topk_groups: int = 1) -> jax.Array:
    """Top-k expert ids per token; a loss-free-balancing bias shifts only this choice.

    The bias is in the router's score units: logits for the softmax routers (softmax is monotone
    per token, so the unbiased choice is the same on logits or probs), sigmoid scores for
    sigmoid_topk (DeepSeek-V3's e_score_correction_bias).
    Group-limited (n_groups > 1, DeepSeek-V3): the E experts form n_groups equal groups, each
    scored by the sum of its two best (biased) scores; a token chooses among the experts of its
    topk_groups best groups only. Excluded experts get -inf, so they are never chosen, even when
    every allowed score is negative.
    """
    choice = scores if bias is None else scores + jax.lax.stop_gradient(bias)
    if n_groups > 1:
        n, e = choice.shape
        per_group = e // n_groups
        group_scores = jnp.sum(jax.lax.top_k(choice.reshape(n, n_groups, per_group), 2)[0], axis=-1)
        kept = jax.lax.top_k(group_scores, topk_groups)[1]  # [N, topk_groups]
        allowed = jnp.zeros((n, n_groups), bool).at[jnp.arange(n)[:, None], kept].set(True)
        choice = jnp.where(jnp.repeat(allowed, per_group, axis=1), choice, -jnp.inf)
    return jax.lax.top_k(choice, k)[1].astype(jnp.int32)


def topk_softmax(logits: jax.Array, k: int, bias: jax.Array | None = None) -> TokenChoice:
    """Mixtral: softmax over the k selected logits (= full softmax, keep top k, renormalise)."""
    logits = logits.astype(jnp.float32)
    ids = _select(logits, k, bias)
    return TokenChoice(jax.nn.softmax(jnp.take_along_axis(logits, ids, axis=-1), axis=-1), ids)


def _scores_topk(scores: jax.Array, choice_scores: jax.Array, k: int, bias: jax.Array | None,
                 renormalize: bool, n_groups: int, topk_groups: int) -> TokenChoice:
    ids = _select(choice_scores, k, bias, n_groups, topk_groups)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        # The epsilon is DeepSeek-V3's: sigmoid weights can all round to 0 in float32.
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return TokenChoice(weights, ids)


def softmax_topk(
    logits: jax.Array, k: int, bias: jax.Array | None = None, renormalize: bool = False,
    n_groups: int = 1, topk_groups: int = 1,
) -> TokenChoice:
    """GShard / Switch / Qwen-MoE / OLMoE: softmax over all experts, keep the top-k probabilities.

    Without renormalisation the k weights sum to less than 1 (exactly the full-softmax probs);
    with it they equal `topk_softmax`'s. The choice is made on logits (plus any bias).
    """
    logits = logits.astype(jnp.float32)
    return _scores_topk(jax.nn.softmax(logits, axis=-1), logits, k, bias, renormalize, n_groups, topk_groups)


def sigmoid_topk(
    logits: jax.Array, k: int, bias: jax.Array | None = None, renormalize: bool = False,
    n_groups: int = 1, topk_groups: int = 1,
) -> TokenChoice:
    """DeepSeek-V3 (and Dots1): per-expert sigmoid scores, the k largest (after the selection
    bias, within the allowed groups) chosen, their unbiased scores the weights."""
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    return _scores_topk(scores, scores, k, bias, renormalize, n_groups, topk_groups)


def capacity_size(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """GShard capacity C = ceil(k * N / E * capacity_factor), at least 1, at most N.

    At most N because top-k ids are distinct per token, so no expert can get more than N slots.
    round(., 9) keeps float noise (1.1 * 10 = 11.000000000000002) from adding a slot.
    """
    raw = top_k * num_tokens / num_experts * capacity_factor
    return max(1, min(num_tokens, math.ceil(round(raw, 9))))


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(N * capacity_factor / E): `capacity_size` with one slot per token, since
    capacity_factor is the average number of experts per token (Zhou et al.'s c); set it to
    top_k for the compute of top-k token choice."""
    return capacity_size(num_tokens, 1, num_experts, capacity_factor)


def expert_choice(logits: jax.Array, capacity_factor: float) -> ExpertChoice:
    """Expert choice (Zhou et al. 2022): every expert takes its C highest-probability tokens.

    Each expert gets exactly C tokens; a token gets 0..E experts. The choice of one token depends
    on every other token in the batch (future positions included), so this router is NOT causal:
    it cannot be used for autoregressive generation as trained.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    capacity = expert_choice_capacity(probs.shape[0], probs.shape[1], capacity_factor)
    # Looks across the whole batch of tokens (not causal): see the docstring.
    gates, token_idx = jax.lax.top_k(probs.T, capacity)
    return ExpertChoice(gates, token_idx.astype(jnp.int32))


def _token_choice(router: Callable[..., TokenChoice], *options: str) -> Callable[[MoEConfig], Router]:
    """Builder binding top_k and the named MoEConfig fields (scalars, not the config itself);
    the weights are multiplied by moe.routed_scaling."""
    def build(moe: MoEConfig) -> Router:
        k, scale = moe.top_k, moe.routed_scaling
        extra = {name: getattr(moe, name) for name in options}

        def route(logits: jax.Array, bias: jax.Array | None) -> TokenChoice:
            choice = router(logits, k, bias, **extra)
            return choice if scale == 1.0 else TokenChoice(choice.weights * scale, choice.expert_ids)
        return route
    return build


def _expert_choice(moe: MoEConfig) -> Router:
    factor = moe.capacity_factor
    # No selection bias: expert choice is balanced by construction (config validation refuses the combination).
    return lambda logits, bias: expert_choice(logits, factor)


# name -> builder from the config; the builder's result is called as router(logits, bias).
ROUTERS.register("topk_softmax", _token_choice(topk_softmax))
ROUTERS.register("softmax_topk", _token_choice(softmax_topk, "renormalize", "n_groups", "topk_groups"))
ROUTERS.register("sigmoid_topk", _token_choice(sigmoid_topk, "renormalize", "n_groups", "topk_groups"))
ROUTERS.register("expert_choice", _expert_choice)


def jitter(x: jax.Array, key: jax.Array, amount: float) -> jax.Array:
    """Switch-style router input noise: x * uniform[1 - amount, 1 + amount], elementwise."""
    noise = jax.random.uniform(key, x.shape, jnp.float32, 1.0 - amount, 1.0 + amount)
    return (x.astype(jnp.float32) * noise).astype(x.dtype)


# ---------------------------------------------------------------- losses and statistics

# aux_loss_scope -> how the [B, T] tokens are grouped for f and P: (groups, tokens per group).
AUX_LOSS_SCOPES.register("batch", lambda b, t: (1, b * t))  # Switch / GShard: one f, P over the global batch
AUX_LOSS_SCOPES.register("sequence", lambda b, t: (b, t))  # per batch row, losses averaged


def load_balancing_loss(probs: jax.Array, assigned: jax.Array) -> jax.Array:
    """Mean over groups of E * sum_i f_i * P_i; 1.0 at perfect balance.

    probs [G, S, E]: full-softmax router probabilities; assigned [G, S, E]: 1 where a token-slot
    is routed to an expert (any router, before capacity drops). f_i = share of the group's routed
    slots on expert i carries no gradient; it flows through P_i (mean prob), pushing probability
    away from overloaded experts. A group with no routed slot (possible with expert choice) has f=0.
    """
    counts = jax.lax.stop_gradient(jnp.sum(assigned.astype(jnp.float32), axis=1))  # [G, E]
    f = counts / jnp.maximum(jnp.sum(counts, axis=-1, keepdims=True), 1.0)
    p = jnp.mean(probs.astype(jnp.float32), axis=1)
    return probs.shape[-1] * jnp.mean(jnp.sum(f * p, axis=-1))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE z-loss mean(logsumexp(logits)^2): keeps router logits small for float stability."""
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2)


def router_stats(probs: jax.Array, assigned: jax.Array) -> dict[str, jax.Array]:
    """Diagnostics (no gradient) over [N, E]: `expert_load` = share of routed token-slots per
    expert (sums to 1; before capacity drops) and `router_entropy` = mean full-softmax entropy."""
    probs = jax.lax.stop_gradient(probs.astype(jnp.float32))
    counts = jax.lax.stop_gradient(jnp.sum(assigned.astype(jnp.float32), axis=0))
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), axis=-1)
    return {"expert_load": counts / jnp.maximum(jnp.sum(counts), 1.0), "router_entropy": jnp.mean(entropy)}


def balance_probabilities(router: str) -> Callable[[jax.Array], jax.Array]:
    """logits [N, E] -> the per-token distribution over experts that the load-balancing loss's
    P_i and the router entropy average: the softmax, or for sigmoid_topk each token's sigmoid
    scores normalised to sum to 1 (DeepSeek-V3's s'_i in its sequence-wise balance loss, which
    is this aux loss with model.moe.aux_loss_scope: sequence)."""
    if router == "sigmoid_topk":
        def normalised_sigmoid(logits: jax.Array) -> jax.Array:
            scores = jax.nn.sigmoid(logits.astype(jnp.float32))
            return scores / jnp.sum(scores, axis=-1, keepdims=True)
        return normalised_sigmoid
    return lambda logits: jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def update_router_bias(bias: jax.Array, expert_load: jax.Array, rate: float, recenter: bool = False) -> jax.Array:
    """Loss-free balancing step (DeepSeek-V3): bias += rate * sign(mean load - load); with
    `recenter`, each layer's bias is then shifted to zero mean (the choice is unchanged by a
    common shift, and the biases cannot drift together).

    bias and expert_load are [..., E] (e.g. [n_layers, E]); under-loaded experts move up by `rate`,
    over-loaded ones down, exactly balanced ones stay. Call outside the gradient, once per step,
    with the global-batch load fractions the model reports in aux["expert_load"].
    """
    load = jax.lax.stop_gradient(expert_load.astype(jnp.float32))
    mean = jnp.mean(load, axis=-1, keepdims=True)
    new = bias + rate * jnp.sign(mean - load)
    if recenter:
        new = new - jnp.mean(new, axis=-1, keepdims=True)
    return new.astype(bias.dtype)
