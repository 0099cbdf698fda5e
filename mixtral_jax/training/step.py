"""The jitted math of training: loss (LM + router aux losses), gradient accumulation,
the optimizer update, and router metrics — all inside one compiled step. A step whose loss or
gradients are not finite changes nothing but its counters (see nonfinite.py)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mixtral_jax.config import Config, LoRAConfig
from mixtral_jax.models.moe import update_router_biases
from mixtral_jax.training import lora, nonfinite

Batch = dict[str, jax.Array]
# {step, params, model_state, opt_state, rng, nonfinite} (+ adapters with LoRA)
TrainState = dict[str, Any]


def trainable_key(cfg: Config) -> str:
    """The state entry the optimizer updates: the LoRA adapters, or the weights themselves."""
    return "adapters" if cfg.finetune.lora.rank > 0 else "params"


@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token, float32 logits [..., V], int targets [...].

    Hand-written gradient: the forward keeps the softmax it computes for log Z, so the backward
    is (softmax - onehot) * g with no second pass of exponentials over [tokens, V]; autodiff
    recomputed them, fused into both LM-head gradient matmuls (measured 2.4% of a CPU dense step)."""
    return _token_nll_fwd(logits, targets)[0]  # undifferentiated, the unused softmax is dead code to XLA


def _token_nll_fwd(logits: jax.Array, targets: jax.Array):
    top = jnp.max(logits, axis=-1, keepdims=True)
    exp = jnp.exp(logits - top)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    log_z = (top + jnp.log(total))[..., 0]
    return log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], (exp / total, targets)


def _token_nll_bwd(res, g):
    probs, targets = res
    onehot = jnp.arange(probs.shape[-1]) == targets[..., None]
    return (probs - onehot) * g[..., None], None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of masked token cross-entropies and the number of counted tokens (float32)."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(token_nll(logits.astype(jnp.float32), targets) * mask), jnp.sum(mask)


def router_metrics(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Summaries of the per-layer x expert load table (fractions of token-slots)."""
    load = aux["expert_load"]  # [layers, experts], each row sums to 1
    mean = jnp.mean(load, axis=-1, keepdims=True)
    return {
        "moe/load_max_over_mean": jnp.mean(jnp.max(load, axis=-1) / mean[:, 0]),
        "moe/load_cv": jnp.mean(jnp.std(load, axis=-1) / mean[:, 0]),
        "moe/dropped_fraction": aux["dropped_fraction"],
        "moe/router_entropy": aux["router_entropy"],
        "moe/expert_load": load,
    }


def make_train_step(cfg: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Build `step(state, batch) -> (state, metrics)`; jit it with the state donated."""
    moe = cfg.model.moe
    accum = cfg.optim.grad_accum
    is_moe = cfg.model.is_moe

    use_jitter = is_moe and moe.jitter > 0
    key_name, lora_cfg = trainable_key(cfg), cfg.finetune.lora

    def microbatch_loss(trainable, params, model_state, mb: Batch, total_tokens, key):
        # Rebuild the non-differentiated variables at this trace level: NNX refuses to merge
        # variables made under an outer trace into a module used by its transforms (nnx.scan).
        model_state = jax.tree.map(lambda v: v, model_state)
        weights = trainable if key_name == "params" else lora.merge(params, trainable, lora_cfg)
        model = nnx.merge(graphdef, weights, model_state)
        logits, aux = model(mb["inputs"], positions=mb["positions"], segment_ids=mb["segment_ids"],
                            router_rng=key if use_jitter else None)
        ce_sum, count = cross_entropy_sums(logits, mb["targets"], mb["loss_mask"])
        # Normalise by the whole batch's token count so accumulated gradients equal the
        # full-batch gradient of the token-mean loss; router losses are averaged over microbatches.
        objective = ce_sum / total_tokens + (moe.aux_loss_coef * aux["aux_loss"] + moe.z_loss_coef * aux["z_loss"]) / accum
        return objective, (ce_sum, count, aux)

    grad_fn = jax.value_and_grad(microbatch_loss, has_aux=True)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        params, model_state = state["params"], state["model_state"]
        trainable = state[key_name]
        frozen = None if key_name == "params" else params  # LoRA: the base weights, not differentiated
        total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
        rng, step_key = jax.random.split(state["rng"])
        micro["key"] = jax.random.split(step_key, accum)

        def accumulate(carry, mb):
            grads, ce_sum, aux_sum = carry
            (_, (ce, _, aux)), g = grad_fn(trainable, frozen, model_state, mb, total_tokens, mb["key"])
            aux_sum = jax.tree.map(lambda a, b: a + b / accum, aux_sum, aux)
            return (jax.tree.map(jnp.add, grads, g), ce_sum + ce, aux_sum), None

        zero_grads = jax.tree.map(jnp.zeros_like, trainable)
        first_mb = jax.tree.map(lambda x: x[0], micro)
        aux_shape = jax.eval_shape(
            lambda: grad_fn(trainable, frozen, model_state, first_mb, total_tokens, first_mb["key"])[0][1][2])
        zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
        (grads, ce_sum, aux), _ = jax.lax.scan(accumulate, (zero_grads, jnp.float32(0.0), zero_aux), micro)

        lm_loss = ce_sum / total_tokens
        metrics = {
            "loss": lm_loss + moe.aux_loss_coef * aux["aux_loss"] + moe.z_loss_coef * aux["z_loss"],
            "lm_loss": lm_loss,
            "aux_loss": aux["aux_loss"],
            "z_loss": aux["z_loss"],
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_schedule(state["step"]),
        }
        if is_moe:
            metrics.update(router_metrics(aux))

        def update(trainable, opt_state, model_state):
            updates, opt_state = tx.update(grads, opt_state, trainable)
            if is_moe and moe.bias_update_rate > 0:
                # Loss-free balancing: nudge each layer's selection bias toward balance, using the
                # load over the whole global batch, outside the gradient.
                model_state = update_router_biases(model_state, aux["expert_load"], moe.bias_update_rate,
                                                   moe.bias_recenter)
            return optax.apply_updates(trainable, updates), opt_state, model_state

        # A non-finite loss or gradient drops the whole update (weights, moments, router biases).
        ok = nonfinite.is_finite(metrics["loss"], metrics["grad_norm"])
        trainable, opt_state, model_state = nonfinite.update_if_finite(
            ok, update, (trainable, state["opt_state"], model_state))
        new_state = dict(state, step=state["step"] + 1, opt_state=opt_state, model_state=model_state, rng=rng)
        new_state[key_name] = trainable
        metrics[nonfinite.SKIPPED] = jnp.logical_not(ok).astype(jnp.int32)
        if nonfinite.COUNTERS in state:  # states built outside the Trainer (benchmarks) may lack it
            new_state[nonfinite.COUNTERS] = nonfinite.count(state[nonfinite.COUNTERS], ok)
            metrics[nonfinite.STREAK] = new_state[nonfinite.COUNTERS]["streak"]
        return new_state, metrics

    return step


def make_eval_step(graphdef: nnx.GraphDef, lora_cfg: LoRAConfig | None = None) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """`eval(params, model_state, batch, adapters=None) -> (sum of token losses, token count)`."""

    def eval_step(params, model_state, batch: Batch, adapters: lora.Adapters | None = None):
        if adapters is not None:
            params = lora.merge(params, adapters, lora_cfg)
        model = nnx.merge(graphdef, params, model_state)
        logits, _ = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
        return cross_entropy_sums(logits, batch["targets"], batch["loss_mask"])

    return eval_step
