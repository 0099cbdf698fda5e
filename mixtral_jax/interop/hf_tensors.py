"""Where each of our per-layer weights lives in an HF checkpoint, and how it is laid out there.

HF Linear weights are [out, in] (y = x W^T); ours are [in..., out...], hence the transposes and
reshapes (wq [dim, H, Dh] <- q_proj [H*Dh, dim]; wo [H, Dh, dim] <- o_proj [dim, H*Dh]). Experts
come either one Linear per expert, as the files transformers writes hold them
(`{moe}experts.{x}.gate_proj.weight`, Mixtral's `w1` / `w3` / `w2`), or fused, as transformers
5.x keeps them in memory (`mlp.experts.gate_up_proj` [E, 2I, dim], gate rows first, and
`down_proj` [E, dim, I]); import reads both, export writes the files' layout.
Layer indices are HF's global ones; hf.py maps them onto our sparse / dense stacks.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple

import numpy as np

from mixtral_jax.config import ModelConfig
from mixtral_jax.interop.hf_archs import Arch

Tensors = Mapping[str, np.ndarray]


class Rule(NamedTuple):
    """How one of our per-layer arrays is read from, and written as, an HF layer's tensors."""

    read: Callable[[Tensors, int, tuple[int, ...]], np.ndarray]  # (tensors, HF layer, our slice shape)
    write: Callable[[np.ndarray, int], dict[str, np.ndarray]]  # (our slice, HF layer) -> HF tensors


def _shaped(value: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    if math.prod(value.shape) != math.prod(shape):
        raise ValueError(f"HF tensor '{name}' has shape {tuple(value.shape)}; the config implies {shape}")
    return value.reshape(shape)


def linear(name: str, in_axes: int = 1) -> Rule:
    """An HF Linear weight [out, in]; ours has `in_axes` leading input axes."""
    def read(t: Tensors, l: int, shape: tuple[int, ...]) -> np.ndarray:
        key = name.format(l=l)
        return _shaped(np.asarray(t[key]).T, shape, key)

    def write(w: np.ndarray, l: int) -> dict[str, np.ndarray]:
        return {name.format(l=l): w.reshape(math.prod(w.shape[:in_axes]), -1).T}
    return Rule(read, write)


def vector(name: str) -> Rule:
    """A norm weight or bias, flat in HF ([H*Dh] for our [H, Dh] biases)."""
    def read(t: Tensors, l: int, shape: tuple[int, ...]) -> np.ndarray:
        key = name.format(l=l)
        return _shaped(np.asarray(t[key]), shape, key)
    return Rule(read, lambda w, l: {name.format(l=l): w.reshape(-1)})


def experts(name: str, num_experts: int) -> Rule:
    """One Linear per expert, `name` with {l} and {x}; ours stacked [E, in, out]."""
    def read(t: Tensors, l: int, shape: tuple[int, ...]) -> np.ndarray:
        keys = [name.format(l=l, x=x) for x in range(num_experts)]
        return np.stack([_shaped(np.asarray(t[k]).T, shape[1:], k) for k in keys])
    return Rule(read, lambda w, l: {name.format(l=l, x=x): w[x].T for x in range(num_experts)})


def fused(name: str, rows: slice | None = None) -> Rule:
    """transformers' in-memory fused experts [E, out, in] (`rows` of gate_up_proj); read only."""
    def read(t: Tensors, l: int, shape: tuple[int, ...]) -> np.ndarray:
        key = name.format(l=l)
        value = np.asarray(t[key])
        return _shaped((value if rows is None else value[:, rows]).transpose(0, 2, 1), shape, key)

    def write(w: np.ndarray, l: int) -> dict[str, np.ndarray]:
        raise NotImplementedError("export writes one tensor per expert")
    return Rule(read, write)


def is_fused(tensors: Tensors, cfg: ModelConfig) -> bool:
    """Whether tensors hold transformers' fused in-memory experts (checked on the first sparse layer)."""
    if not cfg.is_moe:
        return False
    return f"model.layers.{cfg.sparse_layers.index(True)}.mlp.experts.gate_up_proj" in tensors


def layer_rules(arch: Arch, cfg: ModelConfig, sparse: bool, fused_experts: bool = False) -> dict[tuple[str, ...], Rule]:
    """Our block-relative parameter path (e.g. ("attn", "wq")) -> its Rule, for a sparse or dense layer.
    ("ffn", "router_bias") is model state, not a Param: present only where the architecture stores it."""
    a, b = "model.layers.{l}.self_attn.", "model.layers.{l}."
    rules = {
        ("attn", "wq"): linear(a + "q_proj.weight"),
        ("attn", "wk"): linear(a + "k_proj.weight"),
        ("attn", "wv"): linear(a + "v_proj.weight"),
        ("attn", "wo"): linear(a + "o_proj.weight", in_axes=2),
        ("attn_norm", "weight"): vector(b + "input_layernorm.weight"),
        ("ffn_norm", "weight"): vector(b + "post_attention_layernorm.weight"),
    }
    if cfg.qkv_bias:
        for ours, theirs in (("bq", "q_proj"), ("bk", "k_proj"), ("bv", "v_proj")):
            rules[("attn", ours)] = vector(f"{a}{theirs}.bias")
    if cfg.qk_norm != "none":
        for ours, theirs in (("q_norm", "q_norm"), ("k_norm", "k_norm")):
            rules[("attn", ours, "norm", "weight")] = vector(f"{a}{theirs}.weight")
    ffn = ("w_gate", "w_up", "w_down")
    if not sparse:
        for ours, theirs in zip(ffn, ("gate_proj", "up_proj", "down_proj")):
            rules[("ffn", ours)] = linear(f"{b}mlp.{theirs}.weight")
        return rules
    m = b + ("mlp." if fused_experts else arch.moe_prefix)
    rules[("ffn", "router")] = linear(m + "gate.weight")
    if fused_experts:
        width = cfg.expert_width
        rules[("ffn", "w_gate")] = fused(m + "experts.gate_up_proj", slice(0, width))
        rules[("ffn", "w_up")] = fused(m + "experts.gate_up_proj", slice(width, 2 * width))
        rules[("ffn", "w_down")] = fused(m + "experts.down_proj")
    else:
        for ours, theirs in zip(ffn, arch.expert_names):
            rules[("ffn", ours)] = experts(m + "experts.{x}." + theirs + ".weight", cfg.moe.num_experts)
    if cfg.shared_width and arch.shared_name:
        for ours, theirs in zip(ffn, ("gate_proj", "up_proj", "down_proj")):
            rules[("ffn", "shared", ours)] = linear(f"{m}{arch.shared_name}.{theirs}.weight")
    if cfg.moe.shared_gate and arch.shared_gate_name:
        rules[("ffn", "shared_gate")] = linear(m + arch.shared_gate_name)
    if arch.bias_name:
        rules[("ffn", "router_bias")] = vector(m + arch.bias_name)
    return rules
