"""Parameters by component: the one place a parameter's path says what it is (embedding,
attention, router, experts, ...), read by parameter counting, the optimizer's weight decay and
fine-tuning groups, and LoRA's targets; and parameter counts without allocating."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.models.transformer import Transformer

COMPONENTS = ("embedding", "lm_head", "norms", "attention", "router", "experts", "shared_experts", "mlp")


def path_name(path: tuple[Any, ...]) -> str:
    """"blocks.attn.wq" for a pytree path into an nnx State (Variable `value` entries dropped)."""
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    return ".".join(n for n in names if n not in ("value", "raw_value"))


def component(name: str, is_moe: bool) -> str | None:
    """Which of COMPONENTS the parameter at dotted path `name` belongs to (None: none of them).
    A sparse layer's FFN holds `router`, the routed `experts` and the `shared_experts` (with
    their gate); a dense layer's FFN (every layer of a dense model, `dense_blocks` of an MoE
    model) is `mlp`."""
    parts = name.split(".")
    if parts[0] == "embed":
        return "embedding"
    if parts[0] == "lm_head":
        return "lm_head"
    if any(part.endswith("norm") for part in parts):
        return "norms"
    if "attn" in parts:
        return "attention"
    if "router" in parts:
        return "router"
    if "ffn" in parts:
        if not is_moe or parts[0] == "dense_blocks":
            return "mlp"
        return "shared_experts" if ("shared" in parts or "shared_gate" in parts) else "experts"
    return None


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Per-component parameter counts plus `total` and `active` (per token), without allocating.

    active = total - (E - k) / E * routed expert parameters: the router, shared experts, dense
    layers and both embeddings count as active (the Mixtral paper's 12.9B convention).
    """
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    counts: dict[str, int] = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = component(".".join(str(p) for p in path), cfg.is_moe)
        if name is None:
            raise ValueError(f"unaccounted parameter {'/'.join(str(p) for p in path)}")
        size = 1
        for dim in var.shape:
            size *= int(dim)
        counts[name] = counts.get(name, 0) + size
    total = sum(counts.values())
    inactive = 0
    if cfg.is_moe:
        e, k = cfg.moe.num_experts, cfg.moe.top_k
        inactive = counts["experts"] * (e - k) // e  # exact: every expert has the same size
    return {**counts, "total": total, "active": total - inactive}


def count_parameters(model: nnx.Module) -> int:
    """Number of scalar parameters (nnx.Param leaves) of an instantiated model."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
