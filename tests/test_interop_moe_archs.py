"""HF Qwen3-MoE, OLMoE, Qwen2-MoE and Dots1: import and export with logit parity against
transformers on tiny random models, the export's choice of architecture, the refusals; and the
MoE presets' parameter counts against transformers' own count of the official configs.

The tiny models avoid the usual shapes: head_dim (24) != hidden / heads (16) where the
architecture allows it (OLMoE's q_norm spans hidden_size, so it cannot), dense layers among the
sparse ones, shared experts, Dots1's group-limited routing (4 groups, 2 kept) with a non-zero
selection bias and a routing scale, Qwen3's sliding window (8) shorter than the sequence (24).
Router weights are scaled up so routing is decisive, and norms and biases perturbed, so a mix-up
cannot hide behind near-uniform gates or all-ones weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="HF interop tests compare against transformers")
torch = pytest.importorskip("torch", reason="HF interop tests run the reference model in torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from mixtral_jax.cli import main  # noqa: E402
from mixtral_jax.config import load_config  # noqa: E402
from mixtral_jax.interop import hf  # noqa: E402
from mixtral_jax.models.params import param_counts  # noqa: E402

SEQ, VOCAB = 24, 256
TRUNK = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
             max_position_embeddings=64, attn_implementation="eager")


def _configs() -> dict[str, tuple[type, object]]:
    t = transformers
    return {
        "qwen3_moe": (t.Qwen3MoeForCausalLM, t.Qwen3MoeConfig(
            **TRUNK, num_hidden_layers=3, head_dim=24, intermediate_size=96, moe_intermediate_size=40, num_experts=6,
            num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1], use_sliding_window=True,
            sliding_window=8, rms_norm_eps=1e-6)),
        "olmoe": (t.OlmoeForCausalLM, t.OlmoeConfig(
            **TRUNK, num_hidden_layers=2, intermediate_size=40, num_experts=8, num_experts_per_tok=3,
            norm_topk_prob=False, tie_word_embeddings=True, pad_token_id=None, eos_token_id=None)),
        "qwen2_moe": (t.Qwen2MoeForCausalLM, t.Qwen2MoeConfig(
            **TRUNK, num_hidden_layers=4, head_dim=24, intermediate_size=96, moe_intermediate_size=32,
            shared_expert_intermediate_size=56, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2)),
        "dots1": (t.Dots1ForCausalLM, t.Dots1Config(
            **TRUNK, num_hidden_layers=3, head_dim=24, intermediate_size=96, moe_intermediate_size=24,
            n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1, n_group=4,
            topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)),
    }


def _tiny(kind: str, seed: int = 0):
    cls, config = _configs()[kind]
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
                p.mul_(20.0)  # decisive routing / gating, not near-uniform
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    return model.eval()


def _tokens(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(3, SEQ)).astype(np.int32)


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def _our_logits(model, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens)).logits)


def _flat(state) -> dict:
    return {tuple(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


def _expect(kind: str, cfg) -> None:
    moe = cfg.moe
    assert moe.dispatch == "dropless" and cfg.param_dtype == "float32"
    if kind == "qwen3_moe":
        assert (cfg.qk_norm, cfg.head_dim, cfg.sliding_window, cfg.norm_eps) == ("head", 24, 8, 1e-6)
        assert (moe.router, moe.renormalize, cfg.expert_width, cfg.hidden_dim) == ("softmax_topk", True, 40, 96)
        assert cfg.sparse_layers == (True, False, True) and cfg.shared_width == 0
    elif kind == "olmoe":
        assert (cfg.qk_norm, cfg.head_dim, cfg.tie_embeddings, moe.top_k) == ("full", 16, True, 3)
        assert (moe.router, moe.renormalize, cfg.expert_width) == ("softmax_topk", False, 40)
        assert all(cfg.sparse_layers)
    elif kind == "qwen2_moe":
        assert cfg.qkv_bias and moe.shared_gate and cfg.shared_width == 56 and cfg.head_dim == 24
        assert cfg.sparse_layers == (False, True, False, True) and moe.sparse_every == 2
    else:
        assert (moe.router, moe.n_groups, moe.topk_groups, moe.routed_scaling) == ("sigmoid_topk", 4, 2, 2.5)
        assert moe.renormalize and moe.selection_bias and cfg.shared_width == 48 and cfg.qk_norm == "head"
        assert cfg.sparse_layers == (False, True, True)


@pytest.fixture(scope="module", params=list(_configs()))
def imported(request, tmp_path_factory):
    """(kind, HF model, its save_pretrained dir, our imported model, its config, our logits)."""
    kind = request.param
    hf_model = _tiny(kind)
    path = tmp_path_factory.mktemp(kind)
    hf_model.save_pretrained(path)
    model, cfg = hf.load(path)
    return kind, hf_model, path, model, cfg, _our_logits(model, _tokens())


def test_import_logit_parity(imported):
    kind, hf_model, _, model, cfg, ours = imported
    _expect(kind, cfg)
    ref = _hf_logits(hf_model, _tokens())
    assert ours.shape == ref.shape == (3, SEQ, VOCAB)
    assert np.max(np.abs(ours - ref)) <= 1e-4
    if kind == "dots1":  # the selection bias is imported as model state, and it matters here
        bias = _flat(nnx.state(model))[("blocks", "ffn", "router_bias")]
        theirs = [hf_model.model.layers[i].mlp.gate.e_score_correction_bias.numpy() for i in (1, 2)]
        np.testing.assert_array_equal(bias, np.stack(theirs))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        zeroed = nnx.merge(graphdef, params, jax.tree.map(jnp.zeros_like, rest))
        assert np.max(np.abs(_our_logits(zeroed, _tokens()) - ref)) > 1e-3


def test_fused_in_memory_state_dict_matches_file(imported):
    """transformers 5.x keeps experts fused in memory (gate_up_proj); both layouts import alike."""
    kind, hf_model, _, model, cfg, _ = imported
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    sparse = cfg.sparse_layers.index(True)
    assert f"model.layers.{sparse}.mlp.experts.gate_up_proj" in tensors
    from_memory = {**_flat(hf.state_from_hf(tensors, cfg)), **_flat(hf.model_state_from_hf(tensors, cfg))}
    from_file = _flat(nnx.state(model))
    assert from_memory.keys() == from_file.keys()
    for key in from_file:
        assert np.array_equal(from_memory[key], from_file[key]), key


def test_export_loads_in_transformers_with_parity(imported, tmp_path):
    kind, hf_model, _, model, cfg, ours = imported
    hf.save(model, cfg, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == [type(hf_model).__name__] and written["model_type"] == kind
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded) is type(hf_model)
    tokens = _tokens()
    theirs = _hf_logits(reloaded, tokens)
    assert np.max(np.abs(theirs - ours)) <= 1e-4
    assert np.max(np.abs(theirs - _hf_logits(hf_model, tokens))) <= 1e-5  # the same weights came back
    again, cfg2 = hf.load(tmp_path)
    assert cfg2 == cfg
    a, b = _flat(nnx.state(model)), _flat(nnx.state(again))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_cli_round_trip_keeps_the_selection_bias(tmp_path, capsys):
    """`import-hf` -> run directory -> `export-hf`: Dots1's e_score_correction_bias (our model state,
    not a Param) survives the checkpoint, and the export is bit-identical to the original."""
    from mixtral_jax.training.evaluate import load_run_model

    hf_model = _tiny("dots1")
    hf_model.save_pretrained(tmp_path / "hf")
    run, out = tmp_path / "runs" / "dots1", tmp_path / "exported"
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(run)]) == 0
    model, cfg, _ = load_run_model(run)
    assert cfg.model.moe.selection_bias and cfg.model.moe.router == "sigmoid_topk"
    assert np.max(np.abs(_our_logits(model, _tokens()) - _hf_logits(hf_model, _tokens()))) <= 1e-4
    assert main(["export-hf", "--run", str(run), "--out", str(out)]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    original, again = hf_model.state_dict(), reloaded.state_dict()
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name


def test_unsupported_architecture_is_one_line_naming_the_supported_ones(tmp_path):
    config = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 64}
    with pytest.raises(ValueError) as err:
        hf.config_from_hf(config)
    message = str(err.value)
    assert "\n" not in message and "'deepseek_v3' is not supported" in message
    for name in ("MistralForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
                 "Qwen2MoeForCausalLM", "Dots1ForCausalLM"):
        assert name in message
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="deepseek_v3"):
        hf.load(tmp_path)
    with pytest.raises(ValueError, match="architectures.*Qwen3MoeForSequenceClassification"):
        hf.config_from_hf({"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForSequenceClassification"]})


@pytest.mark.parametrize("kind,change,match", [
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
    ("olmoe", {"head_dim": 24}, "head_dim"),
    ("qwen3_moe", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ("qwen3_moe", {"attention_bias": True}, "attention_bias"),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 8, "layer_types": None}, "layer_types"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0}, "shared_expert_intermediate_size"),
    ("dots1", {"layer_types": ["full_attention", "sliding_attention", "sliding_attention"]}, "layer_types"),
    ("dots1", {"first_k_dense_replace": 3}, "first_k_dense_replace"),
    ("dots1", {"n_group": 3}, "n_group"),
    ("dots1", {"n_shared_experts": None}, "n_shared_experts"),
])
def test_import_refuses_what_we_cannot_express(kind, change, match):
    config = {**_configs()[kind][1].to_dict(), **change}
    hf.config_from_hf(_configs()[kind][1].to_dict())  # the unchanged config imports
    with pytest.raises(ValueError, match=match):
        hf.config_from_hf(config)


def _tiny_cfg(*overrides: str):
    return load_config("configs/model/tiny_moe.yaml", ["model.n_layers=3", *overrides]).model


@pytest.mark.parametrize("overrides,architecture", [
    ([], "MixtralForCausalLM"),
    (["model.moe.num_experts=0"], "MistralForCausalLM"),
    (["model.moe.router=softmax_topk", "model.qk_norm=head", "model.moe.dense_layers=[1]"], "Qwen3MoeForCausalLM"),
    (["model.moe.router=softmax_topk", "model.qk_norm=full", "model.head_dim=32", "model.sliding_window=null"],
     "OlmoeForCausalLM"),
    (["model.moe.router=softmax_topk", "model.moe.shared_experts=1", "model.moe.shared_gate=true",
      "model.qkv_bias=true", "model.moe.sparse_every=2"], "Qwen2MoeForCausalLM"),
    (["model.moe.router=sigmoid_topk", "model.qk_norm=head", "model.moe.shared_experts=2",
      "model.moe.first_dense_layers=1", "model.moe.n_groups=4", "model.moe.topk_groups=2"], "Dots1ForCausalLM"),
])
def test_export_picks_the_architecture(overrides, architecture):
    cfg = _tiny_cfg(*overrides)
    assert hf.config_to_hf(cfg)["architectures"] == [architecture]
    assert hf.config_from_hf(hf.config_to_hf(cfg)).sparse_layers == cfg.sparse_layers


@pytest.mark.parametrize("overrides,match", [
    (["model.moe.router=softmax_topk", "model.moe.renormalize=false"], "model.moe.renormalize"),
    (["model.moe.shared_experts=1"], "model.moe.shared_experts"),
    (["model.moe.router=sigmoid_topk"], "model.qk_norm"),
    (["model.moe.router=sigmoid_topk", "model.qk_norm=head", "model.moe.shared_experts=1",
      "model.moe.sparse_every=2"], "sparse_every"),
    (["model.moe.router=softmax_topk", "model.qk_norm=full", "model.head_dim=32", "model.sliding_window=null",
      "model.moe.dense_layers=[0]"], "dense_layers"),
    (["model.moe.router=softmax_topk", "model.qk_norm=full", "model.head_dim=16"], "model.head_dim"),
    (["model.moe.router=softmax_topk", "model.qk_norm=full", "model.head_dim=32"], "model.sliding_window"),
    (["model.qk_norm=head", "model.moe.router=softmax_topk", "model.moe.n_groups=2"], "model.moe.n_groups"),
    (["model.qkv_bias=true"], "model.qkv_bias"),
    (["model.moe.router=expert_choice"], "model.moe.router"),
    (["model.moe.dispatch=capacity"], "model.moe.dispatch"),
    (["model.moe.bias_update_rate=0.001"], "selection_bias"),
])
def test_export_refuses_what_no_architecture_expresses(overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        hf.config_to_hf(_tiny_cfg(*overrides))
    assert "cannot express it" in str(err.value)


# ---------------------------------------------------------------- presets


def _official(name: str):
    """The published HF configs (config.json of the hub repos) of the MoE presets."""
    t = transformers
    if name == "qwen3_30b_a3b":  # Qwen/Qwen3-30B-A3B
        return t.Qwen3MoeForCausalLM, t.Qwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
            num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
            norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960,
            tie_word_embeddings=False, router_aux_loss_coef=0.001)
    if name == "olmoe_1b_7b":  # allenai/OLMoE-1B-7B-0924
        return t.OlmoeForCausalLM, t.OlmoeConfig(
            vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, rope_theta=10000.0,
            rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False, router_aux_loss_coef=0.01)
    return t.MixtralForCausalLM, t.MixtralConfig(  # mistralai/Mixtral-8x22B-(Instruct-)v0.1
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5,
        max_position_embeddings=65536, sliding_window=None, tie_word_embeddings=False)


# preset -> (published total, published active), in billions, with the digits they are published with
PUBLISHED = {"qwen3_30b_a3b": ("30.5", "3.3"), "olmoe_1b_7b": ("6.9", "1.3"), "mixtral_8x22b": ("141", "39")}


def _published_as(n: int, figure: str) -> bool:
    """Whether `figure` (billions) is n rounded or truncated to its last digit: model cards do both
    (Qwen3-30B-A3B's 3.353B active is published as 3.3B, OLMoE's 1.282B as 1.3B)."""
    unit = 10.0 ** -len(figure.partition(".")[2])
    return float(figure) - unit / 2 <= n / 1e9 < float(figure) + unit


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_counts_match_transformers_and_published(preset, capsys):
    assert main(["params", "--config", preset, "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    cls, official = _official(preset)
    with torch.device("meta"):
        model = cls(official)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    e, k = official.num_local_experts, official.num_experts_per_tok
    active = total - routed * (e - k) // e  # every expert the same size: exact
    assert counts["total"] == total
    assert counts["active"] == active
    assert _published_as(total, PUBLISHED[preset][0]) and _published_as(active, PUBLISHED[preset][1])
    # The preset is the model the official config imports as (same function, same counts).
    ours, imported = load_config(preset).model, hf.config_from_hf(official.to_dict())
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "norm_eps", "rope_theta",
                "max_seq_len", "tie_embeddings", "qk_norm", "qkv_bias", "sliding_window", "expert_width",
                "shared_width", "sparse_layers"):
        assert getattr(ours, key) == getattr(imported, key), key
    for key in ("num_experts", "top_k", "router") + (("renormalize",) * (ours.moe.router != "topk_softmax")):
        assert getattr(ours.moe, key) == getattr(imported.moe, key), key
    assert param_counts(imported) == param_counts(ours)
