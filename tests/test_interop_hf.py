"""HF Mistral / Mixtral import and export: logit parity with transformers on tiny random models.

The trunk deliberately has head_dim (32) != hidden / heads (16) and a sliding window (8) shorter
than the sequence (24), so a wrong reshape, RoPE pairing or window convention shows in the logits.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="HF interop tests compare against transformers")
torch = pytest.importorskip("torch", reason="HF interop tests run the reference model in torch")

import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
from flax import nnx  # noqa: E402

from hf_tiny import SEQ, TRUNK, random_tokens, tiny_hf_model  # noqa: E402

from mixtral_jax.interop import hf  # noqa: E402

_hf_model, _tokens = tiny_hf_model, random_tokens


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def _our_logits(model, tokens: np.ndarray) -> np.ndarray:
    logits, _ = model(jnp.asarray(tokens))
    return np.asarray(logits)


def _params(model) -> dict:
    return {tuple(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module", params=["mistral", "mixtral"])
def saved(request, tmp_path_factory):
    kind = request.param
    model = _hf_model(kind, attn_implementation="eager")
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    return kind, model, path


def test_logit_parity(saved):
    kind, hf_model, path = saved
    model, cfg = hf.load(path)
    assert cfg.head_dim == 32 and cfg.sliding_window == 8 and cfg.is_moe == (kind == "mixtral")
    if kind == "mixtral":
        assert cfg.moe.router == "topk_softmax" and cfg.moe.dispatch == "dropless" and cfg.moe.top_k == 2
    tokens = _tokens()
    ref, ours = _hf_logits(hf_model, tokens), _our_logits(model, tokens)
    assert ours.shape == ref.shape == (2, SEQ, 256)
    assert np.max(np.abs(ours - ref)) <= 1e-4
    np.testing.assert_array_equal(np.asarray(model(jnp.asarray(tokens)).logits), ours)  # HF-style `.logits`
    # The window matters for these shapes: without it the late positions' logits differ.
    cfg.sliding_window = None
    unwindowed = nnx.merge(hf._abstract_params(cfg)[0], nnx.state(model, nnx.Param))
    assert np.max(np.abs(_our_logits(unwindowed, tokens) - ref)[:, 8:]) > 1e-3


def test_fused_in_memory_state_dict_matches_file(saved):
    """transformers 5.x keeps Mixtral experts fused (gate_up_proj); both layouts must import alike."""
    kind, hf_model, path = saved
    model, cfg = hf.load(path)
    tensors = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    if kind == "mixtral":
        assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    from_memory = _params(nnx.merge(hf._abstract_params(cfg)[0], hf.state_from_hf(tensors, cfg)))
    from_file = _params(model)
    assert from_memory.keys() == from_file.keys()
    for key in from_file:
        assert np.array_equal(from_memory[key], from_file[key]), key


def test_round_trip(saved, tmp_path):
    kind, hf_model, path = saved
    model, cfg = hf.load(path)
    hf.save(model, cfg, tmp_path)
    again, cfg2 = hf.load(tmp_path)
    assert cfg2 == cfg
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    tokens = _tokens(2)
    assert np.max(np.abs(_hf_logits(reloaded, tokens) - _hf_logits(hf_model, tokens))) <= 1e-5


def test_bf16_checkpoint_and_tied_embeddings(tmp_path):
    """bf16 tensors (which numpy cannot hold natively) load exactly; tied embeddings have no lm_head."""
    model = _hf_model("mistral", tie_word_embeddings=True).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "src")
    ours, cfg = hf.load(tmp_path / "src")
    assert cfg.tie_embeddings and cfg.param_dtype == "bfloat16"
    params = _params(ours)
    assert ("lm_head",) not in params
    embed = model.model.embed_tokens.weight.detach().float().numpy()
    assert params[("embed",)].dtype == ml_dtypes.bfloat16
    assert np.array_equal(params[("embed",)].astype(np.float32), embed)
    hf.save(ours, cfg, tmp_path / "out")
    back, _ = hf.load(tmp_path / "out")
    for key, value in _params(back).items():
        assert np.array_equal(value, params[key]), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


def test_config_round_trip_and_errors():
    base = {**TRUNK, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": 4,
            "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02, "head_dim": None}
    cfg = hf.config_from_hf(base)
    assert cfg.head_dim == 16 and cfg.moe.aux_loss_coef == pytest.approx(0.04)
    assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
    with pytest.raises(ValueError, match="model_type.*llama"):
        hf.config_from_hf({**base, "model_type": "llama"})
    missing = dict(base)
    del missing["num_local_experts"]
    with pytest.raises(ValueError, match="num_local_experts"):
        hf.config_from_hf(missing)
    with pytest.raises(ValueError, match="rope_parameters.rope_type"):
        hf.config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}})
    with pytest.raises(ValueError, match="hidden_act"):
        hf.config_from_hf({**base, "hidden_act": "gelu"})
    cfg.moe.dispatch = "capacity"
    with pytest.raises(ValueError, match="model.moe.dispatch"):
        hf.config_to_hf(cfg)


def test_sharded_checkpoint(saved, tmp_path):
    """A checkpoint split over shards (model.safetensors.index.json) loads the same weights."""
    kind, hf_model, path = saved
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    single, _ = hf.load(path)
    sharded, _ = hf.load(tmp_path)
    a, b = _params(single), _params(sharded)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_load_places_weights_sharded_over_a_mesh(saved):
    """With a mesh, every parameter is put on its FSDP shards as it is read (no gathered copy);
    the model computes the same logits."""
    from meshes import mesh_of

    kind, hf_model, path = saved
    model, cfg = hf.load(path)
    sharded, _ = hf.load(path, mesh=mesh_of({"fsdp": 4}))
    embed = nnx.state(sharded, nnx.Param)["embed"].get_value()
    assert len(embed.sharding.device_set) == 4
    assert embed.addressable_shards[0].data.shape[1] == embed.shape[1] // 4  # model dim split 4 ways
    tokens = _tokens()
    np.testing.assert_allclose(_our_logits(sharded, tokens), _our_logits(model, tokens), atol=1e-5)
