"""Import and export Hugging Face `MistralForCausalLM` / `MixtralForCausalLM` weights.

Why a hand-written mapping: our layout differs from HF's on purpose (layers stacked on a leading
axis for nnx.scan; attention weights [dim, heads, head_dim] so heads can be sharded; experts
stacked [E, in, out]), while HF stores one torch Linear per layer as [out, in]. Every weight is
mapped explicitly here, and the tests check logit parity against transformers itself.

No torch here: files are read and written with the safetensors numpy API. numpy has no
bfloat16, which that API cannot hand back, so BF16 tensors are memory-mapped from the file's
documented layout (8-byte header length, JSON header, raw little-endian data) via ml_dtypes.

RoPE: our `apply_rope` already uses HF's half-split (`rotate_half`) convention, so q_proj and
k_proj are used unpermuted (the parity tests would fail otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from jax.sharding import Mesh
from safetensors.numpy import save_file

from mixtral_jax.config import ModelConfig, MoEConfig
from mixtral_jax.config.choices import DTYPES
from mixtral_jax.models.routing import RouterBias
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.parallel.rules import state_shardings

ARCHITECTURES = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}
_REQUIRED = object()


# ---------------------------------------------------------------- config


def _field(hf: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"HF config field '{key}' is missing")
        return default
    return value


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """An HF Mistral / Mixtral config.json dict -> a ModelConfig whose forward equals HF's.

    Mixtral routes softmax -> top-k -> renormalise, which is our `topk_softmax` (softmax over the
    k selected logits), with the dropless dispatcher (HF never drops tokens). Anything our model
    cannot reproduce exactly raises ValueError naming the HF field.
    """
    hf = dict(hf_config)
    model_type = _field(hf, "model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"HF config field 'model_type': '{model_type}' is not supported "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    for arch in hf.get("architectures") or []:
        if arch != ARCHITECTURES[model_type]:
            raise ValueError(f"HF config field 'architectures': '{arch}' is not supported "
                             f"(expected {ARCHITECTURES[model_type]})")
    if _field(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"HF config field 'hidden_act': '{hf['hidden_act']}' is not supported (only silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"HF config field '{flag}': biases are not supported")
    if hf.get("rope_scaling"):
        raise ValueError("HF config field 'rope_scaling': RoPE scaling is not supported")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"HF config field 'rope_parameters.rope_type': '{rope['rope_type']}' is not supported")
    theta = hf.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        raise ValueError("HF config field 'rope_theta' is missing")

    dim, heads = int(_field(hf, "hidden_size")), int(_field(hf, "num_attention_heads"))
    head_dim = hf.get("head_dim")  # absent: ModelConfig resolves it as hidden_size // heads
    if head_dim is None and dim % heads:
        raise ValueError(f"HF config field 'head_dim' is missing and hidden_size ({dim}) "
                         f"is not divisible by num_attention_heads ({heads})")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"HF config field 'dtype': '{dtype}' is not supported (one of {', '.join(DTYPES.names)})")

    moe = MoEConfig(num_experts=0, z_loss_coef=0.0)
    if model_type == "mixtral":
        e, k = int(_field(hf, "num_local_experts")), int(_field(hf, "num_experts_per_tok"))
        if not 1 <= k <= e:
            raise ValueError(f"HF config field 'num_experts_per_tok': {k} must be in [1, num_local_experts={e}]")
        # HF's balancing loss is top_k times ours for one layer (see routing.py): same gradient scale.
        moe = MoEConfig(num_experts=e, top_k=k, router="topk_softmax", renormalize=True, dispatch="dropless",
                        aux_loss_coef=float(_field(hf, "router_aux_loss_coef", 0.001)) * k, z_loss_coef=0.0,
                        jitter=float(_field(hf, "router_jitter_noise", 0.0)))
    window = hf.get("sliding_window")
    return ModelConfig(
        vocab_size=int(_field(hf, "vocab_size")), dim=dim, n_layers=int(_field(hf, "num_hidden_layers")),
        n_heads=heads, n_kv_heads=int(_field(hf, "num_key_value_heads", heads)),
        head_dim=None if head_dim is None else int(head_dim),
        hidden_dim=int(_field(hf, "intermediate_size")), norm_eps=float(_field(hf, "rms_norm_eps", 1e-5)),
        rope_theta=float(theta), sliding_window=None if window is None else int(window),
        max_seq_len=int(_field(hf, "max_position_embeddings", 32768)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype, param_dtype=dtype, moe=moe)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config.json dict for cfg; ValueError (naming our key) if HF cannot run it exactly."""
    moe = cfg.moe
    head_dim = cfg.head_dim
    out: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": head_dim,
        "intermediate_size": cfg.hidden_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "sliding_window": cfg.sliding_window,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": cfg.param_dtype, "attention_dropout": 0.0, "use_cache": True,
    }
    if not cfg.is_moe:
        return {"architectures": [ARCHITECTURES["mistral"]], "model_type": "mistral", **out}
    if not (moe.router == "topk_softmax" or (moe.router == "softmax_topk" and moe.renormalize)):
        raise ValueError(f"model.moe.router '{moe.router}' (renormalize={moe.renormalize}) has no HF Mixtral "
                         "equivalent; Mixtral is topk_softmax")
    if moe.dispatch == "capacity":
        raise ValueError("model.moe.dispatch 'capacity' drops tokens; HF Mixtral is dropless")
    if moe.bias_update_rate > 0:
        raise ValueError("model.moe.bias_update_rate > 0: HF Mixtral has no router selection bias")
    return {"architectures": [ARCHITECTURES["mixtral"]], "model_type": "mixtral", **out,
            "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k,
            "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k, "router_jitter_noise": moe.jitter,
            "output_router_logits": False}


# ---------------------------------------------------------------- weight mapping

Getter = Callable[[Mapping[str, np.ndarray], int], np.ndarray]  # (HF tensors, layer) -> our layer slice


def _layer_getters(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[tuple[str, ...], Getter]:
    """Our stacked parameter path -> how to build one layer of it from HF tensors.

    HF Linear weights are [out, in] (y = x W^T); ours are [in, out...], hence the transposes.
    Mixtral experts: either the per-expert w1 (gate) / w3 (up) / w2 (down) layout that
    save_pretrained writes, or transformers 5.x's fused in-memory `mlp.experts.gate_up_proj`
    [E, 2I, dim] (gate rows first) and `down_proj` [E, dim, I].
    """
    d, h, kv, i = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim
    hd = cfg.head_dim
    a = "model.layers.{}.self_attn."
    g: dict[tuple[str, ...], Getter] = {
        ("blocks", "attn", "wq"): lambda t, l: t[a.format(l) + "q_proj.weight"].T.reshape(d, h, hd),
        ("blocks", "attn", "wk"): lambda t, l: t[a.format(l) + "k_proj.weight"].T.reshape(d, kv, hd),
        ("blocks", "attn", "wv"): lambda t, l: t[a.format(l) + "v_proj.weight"].T.reshape(d, kv, hd),
        ("blocks", "attn", "wo"): lambda t, l: t[a.format(l) + "o_proj.weight"].T.reshape(h, hd, d),
        ("blocks", "attn_norm", "weight"): lambda t, l: t[f"model.layers.{l}.input_layernorm.weight"],
        ("blocks", "ffn_norm", "weight"): lambda t, l: t[f"model.layers.{l}.post_attention_layernorm.weight"],
    }
    if not cfg.is_moe:
        for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
            g[("blocks", "ffn", ours)] = lambda t, l, n=theirs: t[f"model.layers.{l}.mlp.{n}.weight"].T
        return g
    e = cfg.moe.num_experts
    if "model.layers.0.mlp.experts.gate_up_proj" in tensors:
        m = "model.layers.{}.mlp."
        g[("blocks", "ffn", "router")] = lambda t, l: t[m.format(l) + "gate.weight"].T
        g[("blocks", "ffn", "w_gate")] = lambda t, l: t[m.format(l) + "experts.gate_up_proj"][:, :i].transpose(0, 2, 1)
        g[("blocks", "ffn", "w_up")] = lambda t, l: t[m.format(l) + "experts.gate_up_proj"][:, i:].transpose(0, 2, 1)
        g[("blocks", "ffn", "w_down")] = lambda t, l: t[m.format(l) + "experts.down_proj"].transpose(0, 2, 1)
        return g
    m = "model.layers.{}.block_sparse_moe."
    g[("blocks", "ffn", "router")] = lambda t, l: t[m.format(l) + "gate.weight"].T
    for ours, theirs in (("w_gate", "w1"), ("w_up", "w3"), ("w_down", "w2")):
        g[("blocks", "ffn", ours)] = lambda t, l, n=theirs: np.stack(
            [t[m.format(l) + f"experts.{x}.{n}.weight"].T for x in range(e)])
    return g


def _abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param, ...)


def state_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, mesh: Mesh | None = None) -> nnx.State:
    """HF tensors (a dict, or the lazy reader `load` uses) -> our nnx.Param state for cfg.

    Each stacked parameter is filled layer by layer into one preallocated numpy array, then
    moved to jax before the next one is built, so at most one parameter is held twice. With a
    mesh each parameter goes straight to its shards under the logical-axis rules (FSDP / expert),
    so the model is spread over the devices as it is read rather than gathered on one.
    """
    _, params, _ = _abstract_params(cfg)
    shardings = dict(nnx.to_flat_state(state_shardings(params, mesh))) if mesh is not None else {}
    getters = _layer_getters(cfg, tensors)
    top: dict[tuple[str, ...], Callable[[], np.ndarray]] = {
        ("embed",): lambda: tensors["model.embed_tokens.weight"],
        ("final_norm", "weight"): lambda: tensors["model.norm.weight"],
        ("lm_head",): lambda: tensors["lm_head.weight"].T,
    }
    flat = []
    for key, var in nnx.to_flat_state(params):
        path = tuple(str(p) for p in key)
        shape, dtype = tuple(var.shape), np.dtype(var.dtype)
        try:
            if path in getters:
                value = np.empty(shape, dtype)
                for layer in range(cfg.n_layers):
                    value[layer] = getters[path](tensors, layer)
            else:
                value = np.asarray(top[path](), dtype)
        except KeyError as err:
            raise ValueError(f"HF weights lack tensor {err} (needed for {'/'.join(path)})") from None
        if value.shape != shape:
            raise ValueError(f"{'/'.join(path)}: HF weights give shape {value.shape}, config expects {shape}")
        placed = jax.device_put(value, shardings[key].get_value()) if key in shardings else jnp.asarray(value)
        flat.append((key, var.replace(placed)))
        del value
    return nnx.from_flat_state(flat)


def state_to_hf(model_or_params: nnx.Module | nnx.State, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our model (or its nnx.Param state) -> HF tensor names and [out, in] arrays, in the
    per-expert w1/w2/w3 layout that transformers' save_pretrained writes and from_pretrained reads."""
    config_to_hf(cfg)  # refuses settings HF cannot reproduce
    if isinstance(model_or_params, nnx.Module):
        for _, var in nnx.to_flat_state(nnx.state(model_or_params, RouterBias)):
            if np.any(np.asarray(var[...]) != 0):
                raise ValueError("the model has a non-zero router_bias, which HF Mixtral cannot represent")
        model_or_params = nnx.state(model_or_params, nnx.Param)
    p = {tuple(str(x) for x in path): np.asarray(var[...]) for path, var in nnx.to_flat_state(model_or_params)}
    d = cfg.dim
    out = {"model.embed_tokens.weight": p[("embed",)], "model.norm.weight": p[("final_norm", "weight")]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p[("lm_head",)].T
    for l in range(cfg.n_layers):
        a, b = f"model.layers.{l}.self_attn.", f"model.layers.{l}."
        for proj, key in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv")):
            out[a + proj + ".weight"] = p[("blocks", "attn", key)][l].reshape(d, -1).T
        out[a + "o_proj.weight"] = p[("blocks", "attn", "wo")][l].reshape(-1, d).T
        out[b + "input_layernorm.weight"] = p[("blocks", "attn_norm", "weight")][l]
        out[b + "post_attention_layernorm.weight"] = p[("blocks", "ffn_norm", "weight")][l]
        ffn = {k: p[("blocks", "ffn", k)][l] for k in ("w_gate", "w_up", "w_down")}
        if not cfg.is_moe:
            for theirs, ours in (("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")):
                out[f"{b}mlp.{theirs}.weight"] = ffn[ours].T
            continue
        out[f"{b}block_sparse_moe.gate.weight"] = p[("blocks", "ffn", "router")][l].T
        for x in range(cfg.moe.num_experts):
            for theirs, ours in (("w1", "w_gate"), ("w3", "w_up"), ("w2", "w_down")):
                out[f"{b}block_sparse_moe.experts.{x}.{theirs}.weight"] = ffn[ours][x].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ---------------------------------------------------------------- files


class _SafetensorsDir(Mapping[str, np.ndarray]):
    """Lazy name -> numpy tensor view of a directory's *.safetensors (sharded or single).

    files, when given, restricts it to those files: the original Mistral layout reads only
    consolidated*.safetensors, which can sit beside an HF export's shards in one directory.
    """

    def __init__(self, path: Path, files: list[Path] | None = None):
        index = path / "model.safetensors.index.json"
        if files is not None:
            files = sorted(files)
        elif index.is_file():
            files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path} has no *.safetensors files")
        self._where: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="np") as f:
                for key in f.keys():
                    self._where[key] = file

    def __getitem__(self, key: str) -> np.ndarray:
        file = self._where[key]
        with safe_open(file, framework="np") as f:
            if f.get_slice(key).get_dtype() != "BF16":
                return f.get_tensor(key)
        with open(file, "rb") as fh:  # numpy lacks bfloat16: map the raw bytes (safetensors layout)
            n = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(n))[key]
        start, end = meta["data_offsets"]
        return np.memmap(file, dtype=ml_dtypes.bfloat16, mode="r", offset=8 + n + start, shape=tuple(meta["shape"]))

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def load(path: str | Path, dtype: str | None = None, mesh: Mesh | None = None) -> tuple[Transformer, ModelConfig]:
    """An HF checkpoint directory (config.json + safetensors) -> (our Transformer, its config).

    dtype overrides the compute and parameter dtype (default: the checkpoint's `dtype`); with a
    mesh the weights are placed sharded over it as they are read.
    """
    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    if dtype is not None:
        cfg.dtype = cfg.param_dtype = dtype
    graphdef, _, rest = _abstract_params(cfg)
    params = state_from_hf(_SafetensorsDir(path), cfg, mesh)
    return nnx.merge(graphdef, params, rest), cfg


def _save_bf16(tensors: dict[str, np.ndarray], file: Path) -> None:
    """safetensors writer for tensors that include bfloat16 (which the numpy API refuses)."""
    names = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, arr in tensors.items():
        header[key] = {"dtype": names[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for arr in tensors.values():
            fh.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


def save(model: Transformer | nnx.State, cfg: ModelConfig, path: str | Path) -> None:
    """Write config.json + model.safetensors that transformers' from_pretrained loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = state_to_hf(model, cfg)
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    if any(arr.dtype == ml_dtypes.bfloat16 for arr in tensors.values()):
        _save_bf16(tensors, path / "model.safetensors")
    else:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
