"""Import and export Hugging Face checkpoints: Mistral, Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, Dots1.

Why a hand-written mapping: our layout differs from HF's on purpose (layers stacked on a leading
axis for nnx.scan, an MoE model's sparse and dense layers in two stacks; attention weights
[dim, heads, head_dim] so heads can be sharded; experts stacked [E, in, out]), while HF stores one
torch Linear per layer as [out, in]. Every weight is mapped explicitly (hf_tensors.py), each
architecture's config fields too (hf_archs.py, one table entry per architecture), and the tests
check logit parity against transformers itself.

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
from mixtral_jax.interop.hf_archs import ARCHS, arch_for, arch_for_hf, field
from mixtral_jax.interop.hf_tensors import is_fused, layer_rules
from mixtral_jax.models.layer_plan import stack_index
from mixtral_jax.models.routing import RouterBias
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.parallel.rules import state_shardings

ARCHITECTURES = {a.model_type: a.architecture for a in ARCHS.values()}  # model_type -> transformers class
_field = field


# ---------------------------------------------------------------- config


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """An HF config.json dict -> a ModelConfig whose forward equals HF's.

    The fields every architecture shares are read here, the rest by its hf_archs table entry.
    MoE models use the dropless dispatcher (HF never drops tokens). Anything our model cannot
    reproduce exactly raises ValueError naming the HF field.
    """
    hf = dict(hf_config)
    arch = arch_for_hf(hf)
    if field(hf, "hidden_act", "silu") != "silu":
        raise ValueError(f"HF config field 'hidden_act': '{hf['hidden_act']}' is not supported (only silu)")
    if hf.get("mlp_bias"):
        raise ValueError("HF config field 'mlp_bias': biases are not supported")
    if hf.get("attention_bias"):
        raise ValueError("HF config field 'attention_bias': biases on every attention projection are not supported "
                         "(only q/k/v biases, Qwen2-MoE's qkv_bias)")
    if hf.get("rope_scaling"):
        raise ValueError("HF config field 'rope_scaling': RoPE scaling is not supported")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"HF config field 'rope_parameters.rope_type': '{rope['rope_type']}' is not supported")
    theta = hf.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        raise ValueError("HF config field 'rope_theta' is missing")

    dim, heads = int(field(hf, "hidden_size")), int(field(hf, "num_attention_heads"))
    head_dim = hf.get("head_dim")  # absent: ModelConfig resolves it as hidden_size // heads
    if head_dim is None and dim % heads:
        raise ValueError(f"HF config field 'head_dim' is missing and hidden_size ({dim}) "
                         f"is not divisible by num_attention_heads ({heads})")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"HF config field 'dtype': '{dtype}' is not supported (one of {', '.join(DTYPES.names)})")
    specific = arch.read(hf)
    moe = specific.pop("moe", None) or MoEConfig(num_experts=0, z_loss_coef=0.0)
    defaults = {"rms_norm_eps": 1e-5, "max_position_embeddings": 32768, **arch.defaults}
    return ModelConfig(
        vocab_size=int(field(hf, "vocab_size")), dim=dim, n_layers=int(field(hf, "num_hidden_layers")),
        n_heads=heads, n_kv_heads=int(field(hf, "num_key_value_heads", heads)),
        head_dim=None if head_dim is None else int(head_dim),
        norm_eps=float(field(hf, "rms_norm_eps", defaults["rms_norm_eps"])), rope_theta=float(theta),
        max_seq_len=int(field(hf, "max_position_embeddings", defaults["max_position_embeddings"])),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype, param_dtype=dtype, moe=moe,
        **specific)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The HF config.json dict for cfg, in the one architecture that can run it (hf_archs.arch_for);
    ValueError naming our key if none can run it exactly."""
    arch = arch_for(cfg)
    specific = arch.write(cfg)
    return {
        "architectures": [arch.architecture], "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": cfg.param_dtype, "attention_dropout": 0.0, "use_cache": True, **specific,
    }


# ---------------------------------------------------------------- weight mapping

def _stacks(cfg: ModelConfig) -> dict[str, tuple[bool, list[int]]]:
    """Stack name -> (sparse, the HF layer index of each entry in stack order): `blocks` holds an MoE
    model's sparse layers (every layer of a dense model), `dense_blocks` its dense ones."""
    index = stack_index(cfg.sparse_layers)
    layers = {kind: [l for l, (s, _) in enumerate(index) if s == kind] for kind in (True, False)}
    stacks = {"blocks": (cfg.is_moe, layers[cfg.is_moe])}
    if cfg.is_moe:
        stacks["dense_blocks"] = (False, layers[False])
    return stacks


def _abstract_params(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param, ...)


def _read_state(abstract: nnx.State, tensors: Mapping[str, np.ndarray], cfg: ModelConfig,
                mesh: Mesh | None) -> nnx.State:
    """Fill an abstract state (Params, or the rest: RouterBias) from HF tensors.

    Each stacked array is filled layer by layer into one preallocated numpy array, then moved to
    jax before the next one is built, so at most one parameter is held twice. With a mesh each
    goes straight to its shards under the logical-axis rules (FSDP / expert), so the model is
    spread over the devices as it is read rather than gathered on one.
    """
    shardings = dict(nnx.to_flat_state(state_shardings(abstract, mesh))) if mesh is not None else {}
    arch, stacks, fused = arch_for(cfg), _stacks(cfg), is_fused(tensors, cfg)
    rules = {kind: layer_rules(arch, cfg, kind, fused) for kind in (True, False)}
    top: dict[tuple[str, ...], Callable[[], np.ndarray]] = {
        ("embed",): lambda: tensors["model.embed_tokens.weight"],
        ("final_norm", "weight"): lambda: tensors["model.norm.weight"],
        ("lm_head",): lambda: tensors["lm_head.weight"].T,
    }
    flat = []
    for key, var in nnx.to_flat_state(abstract):
        path = tuple(str(p) for p in key)
        shape, dtype = tuple(var.shape), np.dtype(var.dtype)
        name = "/".join(path)
        try:
            if path[0] in stacks:
                sparse, layers = stacks[path[0]]
                rule = rules[sparse].get(path[1:])
                value = np.zeros(shape, dtype)
                if rule is None and not isinstance(var, RouterBias):  # a bias the architecture lacks stays 0
                    raise ValueError(f"no HF {arch.title} tensor maps to {name}")
                for j, layer in enumerate(layers if rule is not None else ()):
                    value[j] = rule.read(tensors, layer, shape[1:])
            elif path in top:
                value = np.asarray(top[path](), dtype)
            else:
                raise ValueError(f"no HF {arch.title} tensor maps to {name}")
        except KeyError as err:
            raise ValueError(f"HF weights lack tensor {err} (needed for {name})") from None
        if value.shape != shape:
            raise ValueError(f"{name}: HF weights give shape {value.shape}, config expects {shape}")
        placed = jax.device_put(value, shardings[key].get_value()) if key in shardings else jnp.asarray(value)
        flat.append((key, var.replace(placed)))
        del value
    return nnx.from_flat_state(flat)


def state_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, mesh: Mesh | None = None) -> nnx.State:
    """HF tensors (a dict, or the lazy reader `load` uses) -> our nnx.Param state for cfg
    (placed over mesh's devices as read, when given)."""
    return _read_state(_abstract_params(cfg)[1], tensors, cfg, mesh)


def model_state_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, mesh: Mesh | None = None) -> nnx.State:
    """The model state that is not Params: the router selection bias (Dots1's
    e_score_correction_bias; zeros for an architecture without one)."""
    return _read_state(_abstract_params(cfg)[2], tensors, cfg, mesh)


def state_to_hf(model_or_state: nnx.Module | nnx.State, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our model (or its state: the Params, plus any RouterBias) -> HF tensor names and [out, in]
    arrays, in the per-expert layout that transformers' save_pretrained writes and
    from_pretrained reads."""
    config_to_hf(cfg)  # refuses settings HF cannot reproduce
    arch, stacks = arch_for(cfg), _stacks(cfg)
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state
    p, bias = {}, {}
    for path, var in nnx.to_flat_state(state):
        if isinstance(var, (nnx.Param, RouterBias)):
            (bias if isinstance(var, RouterBias) else p)[tuple(str(x) for x in path)] = np.asarray(var[...])
    if arch.bias_name is None and any(np.any(v != 0) for v in bias.values()):
        raise ValueError(f"the model has a non-zero router_bias, which HF {arch.title} cannot represent")
    if arch.bias_name is not None and not bias:
        if cfg.moe.selection_bias or cfg.moe.bias_update_rate > 0:
            raise ValueError("the config has a router_bias, which a Param-only state lacks: pass the model")
        bias = {("blocks", "ffn", "router_bias"): np.zeros((len(stacks["blocks"][1]), cfg.moe.num_experts), np.float32)}
    if arch.bias_name is not None:
        p.update(bias)
    out = {"model.embed_tokens.weight": p.pop(("embed",)), "model.norm.weight": p.pop(("final_norm", "weight"))}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p.pop(("lm_head",)).T
    rules = {kind: layer_rules(arch, cfg, kind) for kind in (True, False)}
    for path, value in p.items():
        sparse, layers = stacks[path[0]]
        rule = rules[sparse].get(path[1:])
        if rule is None:
            raise ValueError(f"{'/'.join(path)} has no HF {arch.title} tensor")
        for j, layer in enumerate(layers):
            out.update(rule.write(value[j], layer))
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
    graphdef, abstract_params, abstract_rest = _abstract_params(cfg)
    tensors = _SafetensorsDir(path)
    params = _read_state(abstract_params, tensors, cfg, mesh)
    return nnx.merge(graphdef, params, _read_state(abstract_rest, tensors, cfg, mesh)), cfg


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


# ---------------------------------------------------------------- tokenizer
