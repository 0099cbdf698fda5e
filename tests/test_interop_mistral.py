"""Original Mistral release layout (params.json + consolidated weights) import.

Tiny random checkpoints are written in mistral-inference's layout. The reference for the
imported model is an independent numpy forward of the *original* model, with RoPE applied to
interleaved pairs as a complex multiply (mistral-inference's convention), so the wq / wk row
permutation the importer applies is checked, not assumed. transformers is a second reference:
the same weights, converted the way HF's convert_mistral_weights_to_hf does (that script is not
shipped in the installed transformers, so its permute recipe is restated here), loaded into
MistralForCausalLM / MixtralForCausalLM. Trunk as in hf_tiny: GQA, head_dim (32) != dim / heads
(16), sliding window (8) < SEQ (24), rope_theta 1e6.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="interop tests compare against transformers")
torch = pytest.importorskip("torch", reason="interop tests write .pth files and run transformers")

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from hf_tiny import SEQ, TRUNK, random_tokens  # noqa: E402

from mixtral_jax.cli import main  # noqa: E402
from mixtral_jax.interop import hf, mistral_format  # noqa: E402

PARAMS = dict(dim=64, n_layers=2, head_dim=32, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
              vocab_size=256, rope_theta=1e6, sliding_window=8)
MOE = {"num_experts": 4, "num_experts_per_tok": 2}
FAKE_TOKENIZER = b"copied byte for byte"


def original_checkpoint(kind: str, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """(params.json dict, float32 tensors in mistral-inference names) for a random tiny model."""
    p = dict(PARAMS, **({"moe": MOE} if kind == "mixtral" else {}))
    rng = np.random.default_rng(seed)
    d, h, kv, hd, i, v = p["dim"], p["n_heads"], p["n_kv_heads"], p["head_dim"], p["hidden_dim"], p["vocab_size"]

    def lin(out: int, inp: int, gain: float = 1.0) -> np.ndarray:
        return (gain * rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm() -> np.ndarray:  # not all ones, so a norm mix-up cannot hide
        return (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    t = {"tok_embeddings.weight": rng.standard_normal((v, d)).astype(np.float32), "norm.weight": norm(),
         "output.weight": lin(v, d)}
    for l in range(p["n_layers"]):
        o = f"layers.{l}."
        # Large q/k gains: sharp attention, so a wrong RoPE pairing moves the logits visibly.
        t |= {o + "attention.wq.weight": lin(h * hd, d, 3.0), o + "attention.wk.weight": lin(kv * hd, d, 3.0),
              o + "attention.wv.weight": lin(kv * hd, d), o + "attention.wo.weight": lin(d, h * hd),
              o + "attention_norm.weight": norm(), o + "ffn_norm.weight": norm()}
        ffns = [o + "feed_forward."] if kind == "mistral" else \
            [o + f"feed_forward.experts.{x}." for x in range(MOE["num_experts"])]
        if kind == "mixtral":
            t[o + "feed_forward.gate.weight"] = lin(MOE["num_experts"], d, 2.0)
        for f in ffns:
            t |= {f + "w1.weight": lin(i, d), f + "w3.weight": lin(i, d), f + "w2.weight": lin(d, i)}
    return p, t


def write_checkpoint(path, params: dict, tensors: dict[str, np.ndarray], fmt: str = "safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    (path / "tokenizer.model").write_bytes(FAKE_TOKENIZER)
    if fmt == "safetensors":
        save_file(tensors, str(path / "consolidated.safetensors"))
    elif fmt == "pth":  # "none": the caller writes the weight files itself
        torch.save({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in tensors.items()},
                   path / "consolidated.00.pth")
    return path


# ---------------------------------------------------------------- references


def reference_logits(p: dict, t: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """mistral-inference's forward in float64 numpy: RoPE on interleaved (complex) pairs, GQA by
    repeating each kv head, SwiGLU, top-k-then-softmax routing. Window: a query sees itself and
    the window-1 keys before it (xformers' local mask, HF's convention)."""
    h, kv, hd = p["n_heads"], p["n_kv_heads"], p["head_dim"]
    w = {k: a.astype(np.float64) for k, a in t.items()}
    x = w["tok_embeddings.weight"][tokens]
    b, n = tokens.shape
    freqs = p["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
    rot = np.exp(1j * np.outer(np.arange(n), freqs))[None, :, None, :]  # [1, T, 1, hd/2]
    q_pos, k_pos = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = (k_pos <= q_pos) & (q_pos - k_pos < p["sliding_window"])

    def rms(z, g):
        return z / np.sqrt(np.mean(z * z, axis=-1, keepdims=True) + p["norm_eps"]) * g

    def rope(z):
        c = (z[..., 0::2] + 1j * z[..., 1::2]) * rot
        out = np.empty_like(z)
        out[..., 0::2], out[..., 1::2] = c.real, c.imag
        return out

    def swiglu(z, f):
        a = z @ w[f + "w1.weight"].T
        return (a / (1 + np.exp(-a)) * (z @ w[f + "w3.weight"].T)) @ w[f + "w2.weight"].T

    for l in range(p["n_layers"]):
        o = f"layers.{l}."
        y = rms(x, w[o + "attention_norm.weight"])
        q = rope((y @ w[o + "attention.wq.weight"].T).reshape(b, n, h, hd))
        k = rope((y @ w[o + "attention.wk.weight"].T).reshape(b, n, kv, hd)).repeat(h // kv, axis=2)
        v = (y @ w[o + "attention.wv.weight"].T).reshape(b, n, kv, hd).repeat(h // kv, axis=2)
        s = np.where(allowed, np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(hd), -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("bhts,bshd->bthd", a, v).reshape(b, n, h * hd) @ w[o + "attention.wo.weight"].T
        y = rms(x, w[o + "ffn_norm.weight"])
        if "moe" not in p:
            x = x + swiglu(y, o + "feed_forward.")
            continue
        gate = y @ w[o + "feed_forward.gate.weight"].T  # [B, T, E]
        top = np.argsort(-gate, axis=-1)[..., :p["moe"]["num_experts_per_tok"]]
        g = np.take_along_axis(gate, top, -1)
        g = np.exp(g - g.max(-1, keepdims=True))
        g /= g.sum(-1, keepdims=True)
        experts = np.stack([swiglu(y, o + f"feed_forward.experts.{e}.") for e in range(gate.shape[-1])], -2)
        x = x + np.sum(g[..., None] * np.take_along_axis(experts, top[..., None], -2), axis=-2)
    return rms(x, w["norm.weight"]) @ w["output.weight"].T


def transformers_model(p: dict, t: dict[str, np.ndarray], path):
    """The weights converted as HF's convert_{mistral,mixtral}_weights_to_hf do, loaded by transformers."""

    def permute(a, n):  # HF's permute_for_rope: view(n, rows/n/2, 2, cols).transpose(1, 2)
        w = torch.from_numpy(a)
        return w.view(n, w.shape[0] // n // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape).numpy()

    out = {"model.embed_tokens.weight": t["tok_embeddings.weight"], "model.norm.weight": t["norm.weight"],
           "lm_head.weight": t["output.weight"]}
    for l in range(p["n_layers"]):
        o, m = f"layers.{l}.", f"model.layers.{l}."
        out |= {m + "self_attn.q_proj.weight": permute(t[o + "attention.wq.weight"], p["n_heads"]),
                m + "self_attn.k_proj.weight": permute(t[o + "attention.wk.weight"], p["n_kv_heads"]),
                m + "self_attn.v_proj.weight": t[o + "attention.wv.weight"],
                m + "self_attn.o_proj.weight": t[o + "attention.wo.weight"],
                m + "input_layernorm.weight": t[o + "attention_norm.weight"],
                m + "post_attention_layernorm.weight": t[o + "ffn_norm.weight"]}
        if "moe" not in p:
            out |= {m + f"mlp.{n}_proj.weight": t[o + f"feed_forward.{w}.weight"]
                    for n, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))}
            continue
        out[m + "block_sparse_moe.gate.weight"] = t[o + "feed_forward.gate.weight"]
        out |= {m + f"block_sparse_moe.experts.{x}.{w}.weight": t[o + f"feed_forward.experts.{x}.{w}.weight"]
                for x in range(MOE["num_experts"]) for w in ("w1", "w2", "w3")}
    if "moe" in p:
        cfg = transformers.MixtralConfig(**TRUNK, num_local_experts=4, num_experts_per_tok=2)
    else:
        cfg = transformers.MistralConfig(**TRUNK)
    cfg.save_pretrained(path)
    save_file({k: np.ascontiguousarray(a) for k, a in out.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _our_logits(model, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens))[0])


def _params(model) -> dict:
    return {tuple(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b) -> None:
    a, b = _params(a), _params(b)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


@pytest.fixture(scope="module", params=["mistral", "mixtral"])
def checkpoint(request, tmp_path_factory):
    kind = request.param
    p, t = original_checkpoint(kind)
    path = write_checkpoint(tmp_path_factory.mktemp(kind) / "raw", p, t)
    return kind, p, t, path


# ---------------------------------------------------------------- tests


def test_logit_parity_with_original_and_transformers(checkpoint, tmp_path):
    kind, p, t, path = checkpoint
    model, cfg = mistral_format.load(path)
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.sliding_window, cfg.rope_theta) == (32, 2, 8, 1e6)
    assert cfg.max_seq_len == mistral_format.DEFAULT_MAX_SEQ_LEN and cfg.param_dtype == "float32"
    if kind == "mixtral":
        assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.router) == (4, 2, "topk_softmax")
        assert cfg.moe.dispatch == "dropless"
    tokens = random_tokens()
    ref = reference_logits(p, t, tokens)
    ours = _our_logits(model, tokens)
    assert ours.shape == ref.shape == (2, SEQ, PARAMS["vocab_size"])
    assert np.max(np.abs(ours - ref)) <= 1e-4
    with torch.no_grad():
        theirs = transformers_model(p, t, tmp_path)(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    assert np.max(np.abs(theirs - ref)) <= 1e-4  # HF's permutation maps the conventions exactly
    assert np.max(np.abs(ours - theirs)) <= 1e-4


def test_rope_permutation_is_required(checkpoint, monkeypatch):
    """Without the wq / wk row permutation the logits move: the parity test has teeth."""
    kind, p, t, path = checkpoint
    if kind != "mistral":
        pytest.skip("one kind suffices")
    monkeypatch.setattr(mistral_format, "interleaved_to_half", lambda w, n: w)
    model, _ = mistral_format.load(path)
    tokens = random_tokens()
    assert np.max(np.abs(_our_logits(model, tokens) - reference_logits(p, t, tokens))) > 1e-2


def test_pth_single_and_split_by_name_match_safetensors(checkpoint, tmp_path):
    kind, p, t, path = checkpoint
    from_st, _ = mistral_format.load(path)
    from_pth, cfg = mistral_format.load(write_checkpoint(tmp_path / "pth", p, t, fmt="pth"))
    assert cfg.is_moe == (kind == "mixtral")
    _assert_same_params(from_st, from_pth)
    split = tmp_path / "split"
    write_checkpoint(split, p, t, fmt="none")
    names = sorted(t)
    for n, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):  # whole tensors per file
        torch.save({k: torch.from_numpy(t[k]) for k in part}, split / f"consolidated.{n:02d}.pth")
    _assert_same_params(from_st, mistral_format.load(split)[0])


def test_legacy_fused_mixtral_layout(checkpoint, tmp_path):
    """The first Mixtral torrent's block_sparse_moe.w1/w2/w3 [E*I, dim] (w2 transposed) layout."""
    kind, p, t, path = checkpoint
    if kind != "mixtral":
        pytest.skip("MoE only")
    fused = {k: a for k, a in t.items() if ".feed_forward." not in k}
    for l in range(p["n_layers"]):
        o = f"layers.{l}."
        fused[o + "block_sparse_moe.gate.weight"] = t[o + "feed_forward.gate.weight"]
        for w in ("w1", "w2", "w3"):
            per = [t[o + f"feed_forward.experts.{x}.{w}.weight"] for x in range(MOE["num_experts"])]
            fused[o + f"block_sparse_moe.{w}"] = np.concatenate([a.T if w == "w2" else a for a in per])
    legacy = write_checkpoint(tmp_path / "legacy", p, fused, fmt="none")
    torch.save({k: torch.from_numpy(a) for k, a in fused.items()}, legacy / "consolidated.00.pt")
    _assert_same_params(mistral_format.load(path)[0], mistral_format.load(legacy)[0])


def test_bf16_weights_load_exactly(tmp_path):
    p, t = original_checkpoint("mistral", seed=3)
    bf = {k: a.astype(ml_dtypes.bfloat16) for k, a in t.items()}
    st = write_checkpoint(tmp_path / "st", p, {}, fmt="none")
    hf._save_bf16(bf, st / "consolidated.safetensors")
    pth = write_checkpoint(tmp_path / "pth", p, {}, fmt="none")
    torch.save({k: torch.from_numpy(a).to(torch.bfloat16) for k, a in t.items()}, pth / "consolidated.00.pth")
    a, cfg = mistral_format.load(st)
    b, _ = mistral_format.load(pth)
    assert cfg.param_dtype == cfg.dtype == "bfloat16"
    _assert_same_params(a, b)
    embed = _params(a)[("embed",)]
    assert embed.dtype == ml_dtypes.bfloat16 and np.array_equal(embed, bf["tok_embeddings.weight"])


def test_weight_errors_name_the_tensor(tmp_path):
    p, t = original_checkpoint("mistral")
    cfg = mistral_format.config_from_params(p)
    missing = {k: a for k, a in t.items() if k != "layers.1.attention.wk.weight"}
    with pytest.raises(ValueError, match=r"lack tensor.*'layers\.1\.attention\.wk\.weight'"):
        mistral_format.state_from_mistral(missing, cfg)
    with pytest.raises(ValueError, match=r"unexpected tensor.*'layers\.0\.attention\.wq\.lora_A\.weight'"):
        mistral_format.state_from_mistral({**t, "layers.0.attention.wq.lora_A.weight": t["norm.weight"]}, cfg)
    wrong = {**t, "layers.0.feed_forward.w2.weight": t["layers.0.feed_forward.w1.weight"]}
    with pytest.raises(ValueError, match=r"'layers\.0\.feed_forward\.w2\.weight' has shape \(128, 64\)"):
        mistral_format.state_from_mistral(wrong, cfg)
    # Tensor-parallel shards repeat every name with a slice of the tensor: refused, naming one.
    tp = write_checkpoint(tmp_path / "tp", p, {}, fmt="none")
    for n in range(2):
        torch.save({"norm.weight": torch.from_numpy(t["norm.weight"])}, tp / f"consolidated.{n:02d}.pth")
    with pytest.raises(ValueError, match="'norm.weight' is in both consolidated.00.pth and.*tensor-parallel"):
        mistral_format.load(tp)
    with pytest.raises(FileNotFoundError, match="no consolidated.safetensors or consolidated.NN.pth"):
        mistral_format.load(write_checkpoint(tmp_path / "empty", p, {}, fmt="none"))


def test_params_errors():
    p = dict(PARAMS, moe=MOE)
    assert mistral_format.config_from_params({**p, "sliding_window": "8", "lora": None}).sliding_window == 8
    assert mistral_format.config_from_params({k: v for k, v in PARAMS.items() if k != "rope_theta"}).rope_theta == 1e4
    with pytest.raises(ValueError, match="'n_heads' is missing"):
        mistral_format.config_from_params({k: v for k, v in p.items() if k != "n_heads"})
    with pytest.raises(ValueError, match="'vision_encoder'.*not supported"):
        mistral_format.config_from_params({**p, "vision_encoder": {"hidden_size": 8}})
    with pytest.raises(ValueError, match="moe.num_experts_per_tok"):
        mistral_format.config_from_params({**p, "moe": {"num_experts": 2, "num_experts_per_tok": 3}})
    with pytest.raises(ValueError, match="'sliding_window'"):
        mistral_format.config_from_params({**p, "sliding_window": [8, 16]})


def test_pth_without_torch_says_what_to_do(tmp_path, monkeypatch):
    p, t = original_checkpoint("mistral")
    path = write_checkpoint(tmp_path / "pth", p, t, fmt="pth")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match="needs torch.*consolidated.safetensors"):
        mistral_format.load(path)


def test_cli_imports_original_layout(checkpoint, tmp_path, capsys):
    from mixtral_jax.training.evaluate import load_run_model

    kind, p, t, path = checkpoint
    if kind != "mixtral":
        pytest.skip("one kind suffices: the loader is shared")
    run = tmp_path / "runs" / "raw_mixtral"
    assert main(["import-hf", str(path), "--out", str(run)]) == 0
    assert (run / "tokenizer.model").read_bytes() == FAKE_TOKENIZER
    model, cfg, step = load_run_model(run)
    assert step == 0 and cfg.model.is_moe and cfg.model.max_seq_len == mistral_format.DEFAULT_MAX_SEQ_LEN
    tokens = random_tokens(2)
    assert np.max(np.abs(_our_logits(model, tokens) - reference_logits(p, t, tokens))) <= 1e-4
    (tmp_path / "neither").mkdir()
    capsys.readouterr()
    assert main(["import-hf", str(tmp_path / "neither"), "--out", str(tmp_path / "runs" / "x")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "params.json" in err and err.count("\n") == 1
    assert not (tmp_path / "runs" / "x").exists()
