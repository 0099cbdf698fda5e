"""Held-out loss and perplexity of a run's latest checkpoint (`mixtral-jax eval`)."""

from __future__ import annotations

import math
from pathlib import Path

import jax
from flax import nnx

from mixtral_jax.config import ConfigError, load_config
from mixtral_jax.data.mixture import mixture_weights
from mixtral_jax.data.pipeline import make_eval_sets
from mixtral_jax.data.tokenizer import load_or_train_tokenizer
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.training.checkpoint import Checkpointer
from mixtral_jax.training.step import make_eval_step


def load_run_model(run_dir: Path) -> tuple[Transformer, object, int]:
    """The model of a run dir with its latest checkpoint's weights, its config and that step."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(config_file)
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=1000)
    step = checkpointer.latest_step()
    if step is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet")
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, params, model_state = nnx.split(abstract, nnx.Param, ...)
    weights = checkpointer.restore_merged(step, {"params": params, "model_state": model_state},
                                          cfg.finetune.lora, cfg.model.is_moe)
    checkpointer.close()
    return nnx.merge(graphdef, weights["params"], weights["model_state"]), cfg, step


def evaluate_run(run_dir: Path, num_batches: int | None = None) -> dict:
    model, cfg, step = load_run_model(run_dir)
    if (run_dir / "tokenizer.model").is_file():
        cfg.data.tokenizer.path = str(run_dir / "tokenizer.model")
    tokenizer = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)
    sets = make_eval_sets(cfg.data, tokenizer, num_batches or cfg.train.eval_batches)
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    eval_step = jax.jit(make_eval_step(graphdef))
    losses, tokens = {}, 0
    for name, batches in sets.items():  # one set, or one per mixture source
        loss_sum = count = 0.0
        for batch in batches:
            s, c = eval_step(params, model_state, batch)
            loss_sum, count = loss_sum + float(s), count + float(c)
        losses[name], tokens = loss_sum / max(count, 1.0), tokens + int(count)
    per_source = {}
    if cfg.data.mixture:  # as in training: eval_loss/<name>, and their mean with the mixture's weights
        per_source = {f"eval_loss/{name}": value for name, value in losses.items()}
        loss = sum(w * losses[m.name] for m, w in zip(cfg.data.mixture, mixture_weights(cfg.data.mixture)))
    else:
        loss = losses[""]
    return {"run": str(run_dir), "step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
            "eval_tokens": tokens, **per_source}
