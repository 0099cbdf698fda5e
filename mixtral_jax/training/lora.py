"""LoRA adapters (Hu et al. 2021) kept beside the frozen base weights, merged functionally.

Adapters live in the train state as `adapters`: a flat dict `"blocks.attn.wq" -> {a, b}`.
A targeted weight W with stacked leading axes (layers, and experts for MoE FFNs) is read as a
matrix [in, out] per leading index, and the model sees W + (alpha / rank) * A @ B with
A [.., in, r] (random) and B [.., r, out] (zero), so training starts exactly at the base model.
Merging is a pure function of (params, adapters): the train step differentiates only the
adapters, and export / eval / generation read merged weights (nothing downstream knows LoRA).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mixtral_jax.config import LoRAConfig
from mixtral_jax.models.params import component, path_name

Adapters = dict[str, dict[str, jax.Array]]
# Vectors and the [dim, 1] shared-expert gate: nothing low-rank to add.
NOT_ADAPTED = ("bq", "bk", "bv", "shared_gate")

def _layout(name: str, ndim: int, is_moe: bool, targets: list[str]) -> tuple[int, int] | None:
    """(leading stacked axes, input axes) of a targeted weight, or None if not targeted.
    Targets are components (models/params.py): attention, experts, shared_experts or mlp. wo maps
    (heads, head_dim) -> dim; wq / wk / wv map dim -> (heads, head_dim); the FFN one axis to one."""
    weight = name.split(".")[-1]
    if component(name, is_moe) not in targets or weight in NOT_ADAPTED:
        return None
    n_in = 2 if weight == "wo" else 1
    n_out = 2 if weight in ("wq", "wk", "wv") else 1
    return ndim - n_in - n_out, n_in


def _flat_params(params: Any) -> dict[str, jax.Array]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {path_name(path): leaf for path, leaf in leaves}


def init_adapters(params: Any, cfg: LoRAConfig, is_moe: bool, key: jax.Array) -> Adapters:
    """Fresh adapters for every targeted weight of `params` (arrays or ShapeDtypeStructs).
    A ~ N(0, 1/in) so the first update's scale does not depend on the width; B = 0."""
    adapters: Adapters = {}
    for index, (name, leaf) in enumerate(sorted(_flat_params(params).items())):
        layout = _layout(name, leaf.ndim, is_moe, cfg.targets)
        if layout is None:
            continue
        lead, n_in = layout
        shape = tuple(leaf.shape)
        fan_in = math.prod(shape[lead:lead + n_in])
        fan_out = math.prod(shape[lead + n_in:])
        a_key = jax.random.fold_in(key, index)
        adapters[name] = {
            "a": jax.random.normal(a_key, (*shape[:lead], fan_in, cfg.rank), jnp.float32) / math.sqrt(fan_in),
            "b": jnp.zeros((*shape[:lead], cfg.rank, fan_out), jnp.float32),
        }
    if not adapters:
        raise ValueError(f"finetune.lora.targets {cfg.targets} selects no weight of this model")
    return adapters


def delta(adapter: dict[str, jax.Array], shape: tuple[int, ...], scale: float) -> jax.Array:
    """scale * A @ B reshaped to the base weight's shape (float32)."""
    product = jnp.einsum("...ir,...ro->...io", adapter["a"], adapter["b"])
    return (scale * product).reshape(shape)


def merge(params: Any, adapters: Adapters | None, cfg: LoRAConfig) -> Any:
    """params with W + (alpha / rank) * A @ B on every adapted weight (same structure, dtypes)."""
    if not adapters:
        return params
    scale = cfg.alpha / cfg.rank

    def one(path: tuple[Any, ...], leaf: jax.Array) -> jax.Array:
        adapter = adapters.get(path_name(path))
        if adapter is None:
            return leaf
        return (leaf.astype(jnp.float32) + delta(adapter, leaf.shape, scale)).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(one, params)


def count(adapters: Adapters) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(adapters))


def abstract_adapters(abstract_params: Any, cfg: LoRAConfig, is_moe: bool) -> Any:
    """Adapter shapes without allocating (restore targets)."""
    return jax.eval_shape(lambda: init_adapters(abstract_params, cfg, is_moe, jax.random.PRNGKey(0)))
