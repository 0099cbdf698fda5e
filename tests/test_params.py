"""Parameter counts: published figures for the presets, and hand counts for tiny models."""

import pytest
from flax import nnx

from mixtral_jax.config import load_config
from mixtral_jax.models.params import count_parameters, param_counts
from mixtral_jax.models.transformer import Transformer


def test_mistral_7b_count():
    counts = param_counts(load_config("configs/model/mistral_7b.yaml").model)
    assert counts["total"] == 7_241_732_096
    assert counts["active"] == counts["total"]
    assert counts["embedding"] == counts["lm_head"] == 32000 * 4096


def test_mixtral_8x7b_count():
    counts = param_counts(load_config("configs/model/mixtral_8x7b.yaml").model)
    assert counts["total"] == 46_702_792_704
    assert counts["active"] == 12_879_925_248
    assert counts["router"] == 32 * 4096 * 8


def hand_count(m) -> dict[str, int]:
    """Straight from the shapes: embed [V,D], per layer wq/wo D*H*Dh, wk/wv D*KV*Dh, two norms,
    FFN 3*D*hidden (times E for experts, plus router D*E); final norm; head [D,V] unless tied."""
    hd = m.head_dim
    attn = 2 * m.dim * m.n_heads * hd + 2 * m.dim * m.n_kv_heads * hd
    e = m.moe.num_experts
    ffn = 3 * m.dim * m.hidden_dim * max(e, 1) + m.dim * e
    total = m.vocab_size * m.dim * (1 if m.tie_embeddings else 2) + m.n_layers * (attn + ffn + 2 * m.dim) + m.dim
    active = total - (e - m.moe.top_k) * 3 * m.dim * m.hidden_dim * m.n_layers if e else total
    return {"total": total, "active": active}


@pytest.mark.parametrize(
    "preset,overrides",
    [
        ("tiny_dense", []),
        ("tiny_moe", []),
        ("tiny_moe", ["model.tie_embeddings=true", "model.head_dim=16", "model.moe.top_k=1"]),
    ],
)
def test_tiny_counts_match_instantiated_model_and_hand_count(preset, overrides):
    cfg = load_config(f"configs/model/{preset}.yaml", ["model.n_layers=2", "model.vocab_size=256", *overrides]).model
    counts = param_counts(cfg)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert counts["total"] == count_parameters(model)
    assert {k: counts[k] for k in ("total", "active")} == hand_count(cfg)
    parts = {k: v for k, v in counts.items() if k not in ("total", "active")}
    assert sum(parts.values()) == counts["total"]
    assert ("lm_head" in counts) != cfg.tie_embeddings
