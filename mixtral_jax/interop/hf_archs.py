"""The Hugging Face architectures we import and export, one table entry each.

Each `Arch` says how its config.json fields map to our ModelConfig (`read`), how a ModelConfig
maps back (`write`, which refuses with a ValueError naming our key what the architecture cannot
run exactly), and the few names its weights differ by (hf_tensors.py does the rest). The fields
every architecture shares (sizes, norms, RoPE, dtype) are read and written by hf.py.

What tells the architectures apart, and so picks the one an export writes (`arch_for`):
  Mistral     dense FFN only
  Mixtral     top-k softmax routing (= softmax, keep top k, renormalise); no QK-norm
  Qwen3-MoE   softmax routing with QK-norm per head; dense layers by decoder_sparse_step / mlp_only_layers
  OLMoE       softmax routing with QK-norm over the whole q / k projection (`full`)
  Qwen2-MoE   a sigmoid-gated shared expert (and q/k/v bias)
  Dots1       sigmoid routing (DeepSeek-V3 style: selection bias, groups, scaling), shared experts,
              QK-norm per head, the first k layers dense
A model whose distinguishing feature belongs to one architecture can only be that one, so when
its other settings do not fit it, no supported architecture can express the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dataclass_field
from typing import Any, Callable, Mapping

from mixtral_jax.config import ModelConfig, MoEConfig

REQUIRED = object()


def field(hf: Mapping[str, Any], key: str | tuple[str, ...], default: Any = REQUIRED) -> Any:
    """hf[key] (the first present of several spellings); a missing or null field takes default,
    or raises ValueError naming it."""
    keys = (key,) if isinstance(key, str) else key
    for k in keys:
        if hf.get(k) is not None:
            return hf[k]
    if default is REQUIRED:
        raise ValueError(f"HF config field '{keys[0]}' is missing")
    return default


def _refuse(hf: Mapping[str, Any], key: str, why: str) -> None:
    """ValueError naming the HF field when it is set (not null / false / empty)."""
    if hf.get(key):
        raise ValueError(f"HF config field '{key}': {hf[key]!r} is not supported ({why})")


@dataclass(frozen=True)
class Arch:
    model_type: str
    architecture: str  # the transformers class
    title: str  # for messages
    read: Callable[[Mapping[str, Any]], dict[str, Any]]  # config.json -> ModelConfig kwargs (moe: a MoEConfig)
    write: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> its config.json fields
    defaults: Mapping[str, Any] = dataclass_field(default_factory=dict)  # shared fields' defaults where absent
    qk_norm: str = "none"  # the only model.qk_norm it has
    moe_prefix: str = "mlp."  # the sparse FFN's module in the files transformers writes
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # gate, up, down
    shared_name: str | None = None  # the shared experts' module (under moe_prefix)
    shared_gate_name: str | None = None  # the shared experts' gate (under moe_prefix)
    bias_name: str | None = None  # the router's selection bias (under moe_prefix)

    def refuse(self, key: str, problem: str, reason: str = "") -> ValueError:
        why = f", the only supported architecture {reason}," if reason else ""
        return ValueError(f"{key}: {problem} (HF {self.title}{why} cannot express it)")


# ---------------------------------------------------------------- shared pieces


def _experts(hf: Mapping[str, Any], e_keys: tuple[str, ...]) -> tuple[int, int]:
    e, k = int(field(hf, e_keys)), int(field(hf, "num_experts_per_tok"))
    if not 1 <= k <= e:
        raise ValueError(f"HF config field 'num_experts_per_tok': {k} must be in [1, {e_keys[0]}={e}]")
    return e, k


def _softmax_moe(hf: Mapping[str, Any], e_keys: tuple[str, ...], width_key: str | None, aux_default: float,
                 **extra: Any) -> MoEConfig:
    """Qwen / OLMoE routing: softmax over all experts, keep the top k (renormalised with
    norm_topk_prob). HF's balancing loss is top_k times ours for one layer (see routing.py)."""
    e, k = _experts(hf, e_keys)
    width = None if width_key is None else int(field(hf, width_key))
    return MoEConfig(num_experts=e, top_k=k, expert_hidden_dim=width, router="softmax_topk",
                     renormalize=bool(field(hf, "norm_topk_prob", False)), dispatch="dropless",
                     aux_loss_coef=float(field(hf, "router_aux_loss_coef", aux_default)) * k, z_loss_coef=0.0, **extra)


def _qwen_layers(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen's layer pattern is ours: layer i sparse iff i not in mlp_only_layers and (i + 1) % step == 0."""
    step = int(field(hf, "decoder_sparse_step", 1))
    if step < 1:
        raise ValueError(f"HF config field 'decoder_sparse_step': {step} must be >= 1")
    return {"sparse_every": step, "dense_layers": sorted(int(i) for i in field(hf, "mlp_only_layers", []))}


def _uniform_window(hf: Mapping[str, Any], layer_types: list[str]) -> int | None:
    """The window of layer_types that are all full or all sliding (ours is one setting for every layer)."""
    n = int(field(hf, "num_hidden_layers"))
    if len(layer_types) != n or not set(layer_types) <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"HF config field 'layer_types': {layer_types!r} is not {n} full_attention / "
                         "sliding_attention entries")
    if "sliding_attention" not in layer_types:
        return None
    if "full_attention" in layer_types:
        raise ValueError("HF config field 'layer_types': sliding-window attention on only some layers is not "
                         "supported (model.sliding_window applies to every layer)")
    return int(field(hf, "sliding_window"))


def _check_attention(arch: Arch, cfg: ModelConfig, reason: str, bias_ok: bool = False) -> None:
    if cfg.qk_norm != arch.qk_norm:
        raise arch.refuse("model.qk_norm", f"'{cfg.qk_norm}' where it has '{arch.qk_norm}'", reason)
    if cfg.qkv_bias and not bias_ok:
        raise arch.refuse("model.qkv_bias", "a q/k/v bias (HF Qwen2-MoE has one, with a gated shared expert)", reason)


def _check_moe(arch: Arch, cfg: ModelConfig, reason: str) -> None:
    """What every HF MoE architecture needs: dropless token choice, no shared experts unless it has them."""
    moe = cfg.moe
    if moe.dispatch == "capacity":
        raise arch.refuse("model.moe.dispatch", "'capacity' drops tokens; HF MoE models are dropless", reason)
    if cfg.shared_width and arch.shared_name is None:
        raise arch.refuse("model.moe.shared_experts", f"{moe.shared_experts} shared experts", reason)


def _softmax_router(arch: Arch, cfg: ModelConfig, reason: str) -> bool:
    """norm_topk_prob for a softmax-routed export, or ValueError for another router."""
    moe = cfg.moe
    if moe.router not in ("topk_softmax", "softmax_topk"):
        raise arch.refuse("model.moe.router", f"'{moe.router}' (it routes softmax -> top-k)", reason)
    for key, value, plain in (("n_groups", moe.n_groups, 1), ("routed_scaling", moe.routed_scaling, 1.0)):
        if value != plain:
            raise arch.refuse(f"model.moe.{key}", f"{value} (group-limited / scaled routing: HF Dots1, with "
                              "router sigmoid_topk)", reason)
    if moe.bias_update_rate > 0 or moe.selection_bias:
        raise arch.refuse("model.moe.selection_bias", "a router selection bias (bias_update_rate > 0 or "
                          "selection_bias; HF Dots1 has one, with router sigmoid_topk)", reason)
    _check_moe(arch, cfg, reason)
    return moe.router == "topk_softmax" or moe.renormalize


def _all_sparse(arch: Arch, cfg: ModelConfig, reason: str) -> None:
    if not all(cfg.sparse_layers):
        dense = [i for i, s in enumerate(cfg.sparse_layers) if not s]
        raise arch.refuse("model.moe.first_dense_layers / sparse_every / dense_layers",
                          f"dense layers {dense} (every layer is MoE)", reason)


def _qwen_pattern(cfg: ModelConfig) -> dict[str, Any]:
    step = cfg.moe.sparse_every
    only = [i for i, s in enumerate(cfg.sparse_layers) if not s and (i + 1) % step == 0]
    return {"decoder_sparse_step": step, "mlp_only_layers": only}


def _aux(cfg: ModelConfig) -> dict[str, Any]:
    return {"router_aux_loss_coef": cfg.moe.aux_loss_coef / cfg.moe.top_k, "output_router_logits": False}


# ---------------------------------------------------------------- the architectures


def _read_mistral(hf: Mapping[str, Any]) -> dict[str, Any]:
    window = hf.get("sliding_window")
    return {"hidden_dim": int(field(hf, "intermediate_size")),
            "sliding_window": None if window is None else int(window)}


def _write_mistral(cfg: ModelConfig) -> dict[str, Any]:
    _check_attention(MISTRAL, cfg, "for dense models")
    return {"intermediate_size": cfg.hidden_dim, "sliding_window": cfg.sliding_window}


def _read_mixtral(hf: Mapping[str, Any]) -> dict[str, Any]:
    e, k = _experts(hf, ("num_local_experts",))
    moe = MoEConfig(num_experts=e, top_k=k, router="topk_softmax", renormalize=True, dispatch="dropless",
                    aux_loss_coef=float(field(hf, "router_aux_loss_coef", 0.001)) * k, z_loss_coef=0.0,
                    jitter=float(field(hf, "router_jitter_noise", 0.0)))
    return {**_read_mistral(hf), "moe": moe}


def _write_mixtral(cfg: ModelConfig) -> dict[str, Any]:
    reason = "with top-k softmax routing and no QK-norm"
    _check_attention(MIXTRAL, cfg, reason)
    if not _softmax_router(MIXTRAL, cfg, reason):
        raise MIXTRAL.refuse("model.moe.renormalize", "false with router softmax_topk (the k weights are "
                             "renormalised; without it: HF Qwen3-MoE with qk_norm head, OLMoE with full)", reason)
    _all_sparse(MIXTRAL, cfg, reason)
    return {"intermediate_size": cfg.expert_width, "sliding_window": cfg.sliding_window, **_aux(cfg),
            "num_local_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k,
            "router_jitter_noise": cfg.moe.jitter}


def _read_qwen3(hf: Mapping[str, Any]) -> dict[str, Any]:
    window = int(field(hf, "sliding_window")) if hf.get("use_sliding_window") else None
    return {"hidden_dim": int(field(hf, "intermediate_size")), "qk_norm": "head", "sliding_window": window,
            "moe": _softmax_moe(hf, ("num_experts", "num_local_experts"), "moe_intermediate_size", 0.001,
                                **_qwen_layers(hf))}


def _write_qwen3(cfg: ModelConfig) -> dict[str, Any]:
    reason = "with softmax routing and per-head QK-norm"
    _check_attention(QWEN3_MOE, cfg, reason)
    return {"intermediate_size": cfg.hidden_dim, "moe_intermediate_size": cfg.expert_width,
            "norm_topk_prob": _softmax_router(QWEN3_MOE, cfg, reason), **_qwen_pattern(cfg), **_aux(cfg),
            "num_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k, "attention_bias": False,
            "use_sliding_window": cfg.sliding_window is not None, "sliding_window": cfg.sliding_window}


def _read_olmoe(hf: Mapping[str, Any]) -> dict[str, Any]:
    _refuse(hf, "clip_qkv", "q/k/v clipping")
    _refuse(hf, "sliding_window", "OLMoE applies it in some attention implementations only")
    dim, heads = int(field(hf, "hidden_size")), int(field(hf, "num_attention_heads"))
    if hf.get("head_dim") not in (None, dim // heads) or dim % heads:
        raise ValueError(f"HF config field 'head_dim': OLMoE's q_norm spans hidden_size ({dim}), so head_dim must "
                         f"be hidden_size / num_attention_heads ({heads})")
    return {"hidden_dim": int(field(hf, "intermediate_size")), "qk_norm": "full",
            "moe": _softmax_moe(hf, ("num_experts", "num_local_experts"), None, 0.01)}


def _write_olmoe(cfg: ModelConfig) -> dict[str, Any]:
    reason = "with QK-norm over the whole projection"
    _check_attention(OLMOE, cfg, reason)
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        raise OLMOE.refuse("model.head_dim", f"{cfg.head_dim} != dim / n_heads (its q_norm spans dim)", reason)
    if cfg.sliding_window is not None:
        raise OLMOE.refuse("model.sliding_window", f"{cfg.sliding_window} (it has full attention only)", reason)
    renorm = _softmax_router(OLMOE, cfg, reason)
    _all_sparse(OLMOE, cfg, reason)
    return {"intermediate_size": cfg.expert_width, "norm_topk_prob": renorm, **_aux(cfg), "clip_qkv": None,
            "num_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k, "attention_bias": False}


def _qwen2_layer_types(hf: Mapping[str, Any]) -> list[str]:
    if hf.get("layer_types") is not None:
        return list(hf["layer_types"])
    sliding, last = bool(hf.get("use_sliding_window", False)), int(hf.get("max_window_layers", 28))
    return ["sliding_attention" if sliding and (i + 1) % 2 and i < last else "full_attention"
            for i in range(int(field(hf, "num_hidden_layers")))]


def _read_qwen2(hf: Mapping[str, Any]) -> dict[str, Any]:
    shared = int(field(hf, "shared_expert_intermediate_size"))
    if shared < 1:
        raise ValueError(f"HF config field 'shared_expert_intermediate_size': {shared} must be >= 1")
    moe = _softmax_moe(hf, ("num_experts", "num_local_experts"), "moe_intermediate_size", 0.001, shared_experts=1,
                       shared_hidden_dim=shared, shared_gate=True, **_qwen_layers(hf))
    return {"hidden_dim": int(field(hf, "intermediate_size")), "qkv_bias": bool(field(hf, "qkv_bias", True)),
            "sliding_window": _uniform_window(hf, _qwen2_layer_types(hf)), "moe": moe}


def _write_qwen2(cfg: ModelConfig) -> dict[str, Any]:
    reason = "with a gated shared expert"
    _check_attention(QWEN2_MOE, cfg, reason, bias_ok=True)
    window = cfg.sliding_window
    return {"intermediate_size": cfg.hidden_dim, "moe_intermediate_size": cfg.expert_width,
            "shared_expert_intermediate_size": cfg.shared_width, "qkv_bias": cfg.qkv_bias,
            "norm_topk_prob": _softmax_router(QWEN2_MOE, cfg, reason), **_qwen_pattern(cfg), **_aux(cfg),
            "num_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k,
            "use_sliding_window": window is not None, "sliding_window": window, "max_window_layers": cfg.n_layers,
            "layer_types": ["sliding_attention" if window else "full_attention"] * cfg.n_layers}


def _read_dots1(hf: Mapping[str, Any]) -> dict[str, Any]:
    e, k = _experts(hf, ("n_routed_experts", "num_local_experts"))
    n, first = int(field(hf, "num_hidden_layers")), int(field(hf, "first_k_dense_replace", 0))
    if not 0 <= first < n:
        raise ValueError(f"HF config field 'first_k_dense_replace': {first} leaves no MoE layer of {n}")
    shared = int(field(hf, "n_shared_experts"))
    if shared < 1:
        raise ValueError(f"HF config field 'n_shared_experts': {shared} must be >= 1")
    groups, top_groups = int(field(hf, "n_group", 1)), int(field(hf, "topk_group", 1))
    if groups < 1 or e % groups or (groups > 1 and e // groups < 2):
        raise ValueError(f"HF config field 'n_group': {groups} must split {e} experts into groups of at least 2")
    if not 1 <= top_groups <= groups or top_groups * (e // groups) < k:
        raise ValueError(f"HF config field 'topk_group': {top_groups} must be in [1, n_group] and hold top_k ({k})")
    window = hf.get("sliding_window", 4096)  # Dots1Config's defaults, for a config.json without the keys
    types = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= hf.get("max_window_layers", 62)
                                      else "full_attention" for i in range(n)]
    # HF keeps no balancing loss and never updates the bias: selection_bias keeps it as model state.
    moe = MoEConfig(num_experts=e, top_k=k, expert_hidden_dim=int(field(hf, "moe_intermediate_size")),
                    shared_experts=shared, first_dense_layers=first, router="sigmoid_topk",
                    renormalize=bool(field(hf, "norm_topk_prob", False)), n_groups=groups, topk_groups=top_groups,
                    routed_scaling=float(field(hf, "routed_scaling_factor", 1.0)), selection_bias=True,
                    dispatch="dropless", aux_loss_coef=0.0, z_loss_coef=0.0)
    return {"hidden_dim": int(field(hf, "intermediate_size")), "qk_norm": "head",
            "sliding_window": _uniform_window(hf, types), "moe": moe}


def _write_dots1(cfg: ModelConfig) -> dict[str, Any]:
    reason = "with sigmoid routing"
    moe = cfg.moe
    _check_attention(DOTS1, cfg, reason)
    _check_moe(DOTS1, cfg, reason)
    if moe.shared_gate:
        raise DOTS1.refuse("model.moe.shared_gate", "a gated shared expert", reason)
    if not cfg.shared_width or cfg.shared_width % cfg.expert_width:
        raise DOTS1.refuse("model.moe.shared_experts / shared_hidden_dim",
                           f"shared experts of total width {cfg.shared_width} (it has n_shared_experts of the "
                           f"routed width {cfg.expert_width}, at least one)", reason)
    first = cfg.sparse_layers.index(True)
    if cfg.sparse_layers != tuple(i >= first for i in range(cfg.n_layers)):
        raise DOTS1.refuse("model.moe.sparse_every / dense_layers", "dense layers after the first sparse one "
                           "(only the first k layers are dense)", reason)
    window = cfg.sliding_window
    return {"intermediate_size": cfg.hidden_dim, "moe_intermediate_size": cfg.expert_width,
            "n_routed_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "n_shared_experts": cfg.shared_width // cfg.expert_width, "first_k_dense_replace": first,
            "norm_topk_prob": moe.renormalize, "n_group": moe.n_groups, "topk_group": moe.topk_groups,
            "routed_scaling_factor": moe.routed_scaling, "attention_bias": False, "output_router_logits": False,
            "sliding_window": window, "max_window_layers": 0 if window else cfg.n_layers,
            "layer_types": ["sliding_attention" if window else "full_attention"] * cfg.n_layers}


MISTRAL = Arch("mistral", "MistralForCausalLM", "Mistral", _read_mistral, _write_mistral)
MIXTRAL = Arch("mixtral", "MixtralForCausalLM", "Mixtral", _read_mixtral, _write_mixtral,
               moe_prefix="block_sparse_moe.", expert_names=("w1", "w3", "w2"))
QWEN3_MOE = Arch("qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3-MoE", _read_qwen3, _write_qwen3,
                 defaults={"rms_norm_eps": 1e-6, "max_position_embeddings": 32768}, qk_norm="head")
OLMOE = Arch("olmoe", "OlmoeForCausalLM", "OLMoE", _read_olmoe, _write_olmoe,
             defaults={"rms_norm_eps": 1e-5, "max_position_embeddings": 4096}, qk_norm="full")
QWEN2_MOE = Arch("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2-MoE", _read_qwen2, _write_qwen2,
                 defaults={"rms_norm_eps": 1e-6, "max_position_embeddings": 32768}, shared_name="shared_expert",
                 shared_gate_name="shared_expert_gate.weight")
DOTS1 = Arch("dots1", "Dots1ForCausalLM", "Dots1", _read_dots1, _write_dots1,
             defaults={"rms_norm_eps": 1e-6, "max_position_embeddings": 2048}, qk_norm="head",
             shared_name="shared_experts", bias_name="gate.e_score_correction_bias")

ARCHS: dict[str, Arch] = {a.model_type: a for a in (MISTRAL, MIXTRAL, QWEN3_MOE, OLMOE, QWEN2_MOE, DOTS1)}


def arch_for_hf(hf: Mapping[str, Any]) -> Arch:
    """The table entry for an HF config.json; one ValueError line naming what is not supported."""
    model_type = field(hf, "model_type")
    supported = ", ".join(f"{a.architecture} ({a.model_type})" for a in ARCHS.values())
    if model_type not in ARCHS:
        raise ValueError(f"HF config field 'model_type': '{model_type}' is not supported (supported: {supported})")
    arch = ARCHS[model_type]
    for name in hf.get("architectures") or []:
        if name != arch.architecture:
            raise ValueError(f"HF config field 'architectures': '{name}' is not supported "
                             f"(expected {arch.architecture} for model_type '{model_type}'; supported: {supported})")
    return arch


def arch_for(cfg: ModelConfig) -> Arch:
    """The one architecture that can express cfg, if any can (its `write` then checks the rest)."""
    if not cfg.is_moe:
        return MISTRAL
    if cfg.moe.router == "sigmoid_topk":
        return DOTS1
    if cfg.moe.shared_gate:
        return QWEN2_MOE
    return {"full": OLMOE, "head": QWEN3_MOE}.get(cfg.qk_norm, MIXTRAL)
