"""Import the original Mistral release layout (mistral-inference): params.json + consolidated weights.

Raw releases such as Mistral-7B-v0.1 and Mixtral-8x7B ship `params.json`, `tokenizer.model` and
either `consolidated.safetensors` or `consolidated.NN.pth` / `.pt` files with mistral-inference's
tensor names (`layers.N.attention.wq.weight`, ...). Rather than a second copy of the placement
code, the tensors are presented under HF names (a lazy view) and handed to `hf.state_from_hf`,
so both imports build our nnx state the same way, one parameter at a time.

RoPE: mistral-inference rotates interleaved pairs (x0, x1), (x2, x3), ... (a complex view of the
head), while our `apply_rope` (like HF) pairs x_i with x_{i + D/2}. Permuting each head's wq / wk
output rows from [pair, component] to [component, pair] order turns one into the other: q . k is
a sum over the same pairs either way, so attention is unchanged. tests/test_interop_mistral.py
checks this against an independent reference forward of the original model.

Tensor-parallel checkpoints (one tensor split across several .pth files) are refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mixtral_jax.config import ModelConfig
from mixtral_jax.interop import hf
from mixtral_jax.models.transformer import Transformer

PARAMS = "params.json"
# Context length when params.json has no max_seq_len: these releases were published (and are
# configured by HF) with 32768 positions; RoPE itself has no table, so this is only a bound.
DEFAULT_MAX_SEQ_LEN = 32768
_REQUIRED = ("dim", "n_layers", "hidden_dim", "n_heads", "norm_eps", "vocab_size")
# params.json keys that do not change the forward pass (serving knobs) or are handled here.
_KNOWN = set(_REQUIRED) | {"head_dim", "n_kv_heads", "rope_theta", "sliding_window", "moe", "max_seq_len",
                           "max_batch_size", "model_type"}
_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
           np.dtype(ml_dtypes.bfloat16): "bfloat16"}


# ---------------------------------------------------------------- config


def config_from_params(params: Mapping[str, Any], dtype: str = "float32") -> ModelConfig:
    """A mistral-inference params.json dict -> our ModelConfig (dtype: the weights' dtype).

    Keys that could change the model and that we do not implement (vision encoders, LoRA,
    rope scaling, a per-layer sliding-window list, ...) raise ValueError naming the key, rather
    than importing a model that silently computes something else. Null / false values are
    ignored, since they switch the feature off.
    """
    p = {k: v for k, v in params.items() if v is not None and v is not False}
    for key in _REQUIRED:
        if key not in p:
            raise ValueError(f"params.json field '{key}' is missing")
    unknown = sorted(set(p) - _KNOWN)
    if unknown:
        raise ValueError(f"params.json field(s) {', '.join(map(repr, unknown))} are not supported "
                         f"(supported: {', '.join(sorted(_KNOWN))})")
    if p.get("model_type", "transformer") != "transformer":
        raise ValueError(f"params.json field 'model_type': '{p['model_type']}' is not supported (only transformer)")
    window = p.get("sliding_window")
    if window is not None and not isinstance(window, (int, str)):
        raise ValueError(f"params.json field 'sliding_window': {window!r} is not supported (one int only)")
    dim, heads = int(p["dim"]), int(p["n_heads"])
    hf_config: dict[str, Any] = {
        "model_type": "mistral", "hidden_size": dim, "num_hidden_layers": int(p["n_layers"]),
        "num_attention_heads": heads, "num_key_value_heads": int(p.get("n_kv_heads", heads)),
        "head_dim": p.get("head_dim"), "intermediate_size": int(p["hidden_dim"]),
        "rms_norm_eps": float(p["norm_eps"]), "vocab_size": int(p["vocab_size"]),
        "rope_theta": float(p.get("rope_theta", 10000.0)),
        # Older params.json files store the window as a string.
        "sliding_window": None if window is None else int(window),
        "max_position_embeddings": int(p.get("max_seq_len", DEFAULT_MAX_SEQ_LEN)), "dtype": dtype,
    }
    if "moe" in p:
        moe = dict(p["moe"])
        extra = sorted(set(moe) - {"num_experts", "num_experts_per_tok"})
        if extra:
            raise ValueError(f"params.json field(s) {', '.join('moe.' + k for k in extra)} are not supported")
        for key in ("num_experts", "num_experts_per_tok"):
            if key not in moe:
                raise ValueError(f"params.json field 'moe.{key}' is missing")
        e, k = int(moe["num_experts"]), int(moe["num_experts_per_tok"])
        if not 1 <= k <= e:
            raise ValueError(f"params.json field 'moe.num_experts_per_tok': {k} must be in [1, num_experts={e}]")
        # mistral-inference routes top-k of the gate logits, then softmaxes those k: the same
        # function as HF Mixtral, so hf.config_from_hf's MoE settings (topk_softmax, dropless) apply.
        hf_config.update(model_type="mixtral", num_local_experts=e, num_experts_per_tok=k)
    return hf.config_from_hf(hf_config)


# ---------------------------------------------------------------- weight mapping


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """wq / wk [n_heads * head_dim, in] from interleaved-pair RoPE row order to half-split order.

    Within a head, original row 2j + c (pair j, component c) becomes row c * head_dim/2 + j.
    """
    rows, cols = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


# HF name -> (original name, its expected [out, in] shape, how to turn it into the HF tensor)
_Entry = tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _mapping(cfg: ModelConfig, names: set[str]) -> dict[str, _Entry]:
    """Every HF tensor `hf.state_from_hf` reads, and where it comes from in the original layout.

    Two MoE layouts exist: mistral-inference's per-expert `feed_forward.experts.E.w1.weight`, and
    the first Mixtral-8x7B torrent's fused `block_sparse_moe.w1` [E*I, dim] (w2 stored as [E*I, dim],
    i.e. transposed relative to a Linear weight), which HF's own converter slices per expert.
    """
    d, h, kv, i = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim
    hd = cfg.head_dim
    m: dict[str, _Entry] = {
        "model.embed_tokens.weight": ("tok_embeddings.weight", (cfg.vocab_size, d), _same),
        "model.norm.weight": ("norm.weight", (d,), _same),
        "lm_head.weight": ("output.weight", (cfg.vocab_size, d), _same),
    }
    legacy = "layers.0.block_sparse_moe.w1" in names
    for l in range(cfg.n_layers):
        a, o, b = f"model.layers.{l}.self_attn.", f"layers.{l}.", f"model.layers.{l}."
        m[a + "q_proj.weight"] = (o + "attention.wq.weight", (h * hd, d), lambda w: interleaved_to_half(w, h))
        m[a + "k_proj.weight"] = (o + "attention.wk.weight", (kv * hd, d), lambda w: interleaved_to_half(w, kv))
        m[a + "v_proj.weight"] = (o + "attention.wv.weight", (kv * hd, d), _same)
        m[a + "o_proj.weight"] = (o + "attention.wo.weight", (d, h * hd), _same)
        m[b + "input_layernorm.weight"] = (o + "attention_norm.weight", (d,), _same)
        m[b + "post_attention_layernorm.weight"] = (o + "ffn_norm.weight", (d,), _same)
        shapes = {"w1": (i, d), "w3": (i, d), "w2": (d, i)}
        if not cfg.is_moe:
            for theirs, ours in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                m[f"{b}mlp.{theirs}.weight"] = (f"{o}feed_forward.{ours}.weight", shapes[ours], _same)
            continue
        e = cfg.moe.num_experts
        moe, ffn = f"{b}block_sparse_moe.", o + ("block_sparse_moe." if legacy else "feed_forward.")
        m[moe + "gate.weight"] = (ffn + "gate.weight", (e, d), _same)
        for x in range(e):
            for w in ("w1", "w2", "w3"):
                if not legacy:
                    m[f"{moe}experts.{x}.{w}.weight"] = (f"{ffn}experts.{x}.{w}.weight", shapes[w], _same)
                    continue
                rows = slice(x * i, (x + 1) * i)
                take = (lambda t, r=rows: t[r].T) if w == "w2" else (lambda t, r=rows: t[r])
                m[f"{moe}experts.{x}.{w}.weight"] = (ffn + w, (e * i, d), take)
    return m


class _AsHF(Mapping[str, np.ndarray]):
    """Original-layout tensors seen under HF names, converted (and shape-checked) on access."""

    def __init__(self, tensors: Mapping[str, np.ndarray], mapping: dict[str, _Entry]):
        self._tensors, self._mapping = tensors, mapping

    def __getitem__(self, key: str) -> np.ndarray:
        name, shape, convert = self._mapping[key]
        value = self._tensors[name]
        if tuple(value.shape) != shape:
            raise ValueError(f"tensor '{name}' has shape {tuple(value.shape)}, params.json implies {shape}")
        return convert(value)

    def __contains__(self, key: object) -> bool:  # Mapping's default would load the tensor
        return key in self._mapping

    def __iter__(self) -> Iterator[str]:
        return iter(self._mapping)

    def __len__(self) -> int:
        return len(self._mapping)


def state_from_mistral(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, mesh: Mesh | None = None) -> nnx.State:
    """Original-layout tensors (a dict, or the lazy reader `open_weights` returns) -> our nnx.Param
    state. Names are checked before any weight is read: a missing or unexpected tensor raises
    ValueError naming it (unexpected ones are e.g. LoRA or vision weights we would drop)."""
    names = set(tensors)
    mapping = _mapping(cfg, names)
    wanted = {name for name, _, _ in mapping.values()}
    missing, unexpected = sorted(wanted - names), sorted(names - wanted)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"weights lack tensor(s) {', '.join(map(repr, missing[:5]))}{more} "
                         f"(needed by the model params.json describes)")
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ValueError(f"weights hold unexpected tensor(s) {', '.join(map(repr, unexpected[:5]))}{more}: "
                         "not part of the model params.json describes (LoRA / vision weights are not supported)")
    return hf.state_from_hf(_AsHF(tensors, mapping), cfg, mesh)


# ---------------------------------------------------------------- files


class _TorchFiles(Mapping[str, np.ndarray]):
    """Lazy name -> numpy view of consolidated.NN.pth files that split the model by tensor name.

    torch is imported only here (it is a test dependency, not a runtime one). Files are
    memory-mapped, so tensors are paged in as state_from_hf reaches them.
    """

    def __init__(self, files: list[Path]):
        try:
            import torch
        except ImportError:
            raise ImportError(f"reading {files[0].name} needs torch (pip install torch); or use a "
                              "consolidated.safetensors copy of the weights, which needs no torch") from None
        self._torch = torch
        self._where: dict[str, dict[str, Any]] = {}
        first_file: dict[str, str] = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # pre-zipfile torch.save format cannot be memory-mapped
                state = torch.load(file, map_location="cpu", weights_only=True)
            for key in state:
                if key in first_file:
                    raise ValueError(f"tensor '{key}' is in both {first_file[key]} and {file.name}: a "
                                     "tensor-parallel checkpoint (one tensor split across files) is not "
                                     "supported; merge the shards first")
                first_file[key] = file.name
                self._where[key] = state

    def __getitem__(self, key: str) -> np.ndarray:
        tensor = self._where[key][key].detach().contiguous()
        if tensor.dtype == self._torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return tensor.view(self._torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def weight_files(path: Path) -> list[Path]:
    """The weight files import reads: consolidated*.safetensors if present (no torch needed, and
    releases that ship both hold the same weights), else consolidated.NN.pth / .pt."""
    safetensors = sorted(path.glob("consolidated*.safetensors"))
    if safetensors:
        return safetensors
    pth = [f for f in path.iterdir() if re.fullmatch(r"consolidated(\.\d+)?\.pth?", f.name)]
    if not pth:
        raise FileNotFoundError(f"{path} has no consolidated.safetensors or consolidated.NN.pth weights")
    return sorted(pth)


def open_weights(path: str | Path) -> Mapping[str, np.ndarray]:
    """A lazy name -> numpy tensor mapping over the directory's original-layout weights."""
    path = Path(path)
    files = weight_files(path)
    if files[0].suffix == ".safetensors":
        return hf._SafetensorsDir(path, files)
    return _TorchFiles(files)


def load(path: str | Path, dtype: str | None = None, mesh: Mesh | None = None) -> tuple[Transformer, ModelConfig]:
    """An original Mistral release directory -> (our Transformer, its config).

    dtype overrides the compute and parameter dtype (default: the weights' own dtype); with a
    mesh the weights are placed sharded over it as they are read.
    """
    path = Path(path)
    params_file = path / PARAMS
    if not params_file.is_file():
        raise FileNotFoundError(f"{path} has no {PARAMS} (not an original Mistral release directory)")
    params = json.loads(params_file.read_text())
    tensors = open_weights(path)
    if dtype is None:
        if "tok_embeddings.weight" not in tensors:
            raise ValueError("weights lack tensor 'tok_embeddings.weight'")
        stored = np.dtype(tensors["tok_embeddings.weight"].dtype)
        if stored not in _DTYPES:
            raise ValueError(f"tensor 'tok_embeddings.weight' has dtype {stored}, "
                             f"not one of {', '.join(_DTYPES.values())}")
        dtype = _DTYPES[stored]
    cfg = config_from_params(params, dtype)
    graphdef, _, rest = hf._abstract_params(cfg)
    return nnx.merge(graphdef, state_from_mistral(tensors, cfg, mesh), rest), cfg
