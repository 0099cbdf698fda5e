"""AdamW with linear warmup and a decay schedule, global-norm clipping, gradient accumulation."""

from __future__ import annotations

import jax
import optax

from mixtral_jax.config import OptimConfig


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine / linear decay to `lr * min_lr_ratio` (or constant)."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def _decay_mask(params):
    """Decay weight matrices only. Norm scales are excluded by name, not by rank, because
    scanned layers stack every per-layer vector into a matrix."""

    def decays(path, leaf) -> bool:
        names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()
        return "norm" not in names and "bias" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """The optimizer applied once per (accumulated) step."""
    chain = []
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(
        optax.adamw(
            learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*chain)
