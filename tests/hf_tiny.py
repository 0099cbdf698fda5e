"""Tiny random HF Mistral / Mixtral models shared by the interop tests (torch + transformers,
the test extra). The trunk has head_dim (32) != hidden / heads (16) and a sliding window (8)
shorter than SEQ (24), so a wrong reshape, RoPE pairing or window convention shows in the logits;
max_position_embeddings (64) is below the default data.seq_len."""

from __future__ import annotations

import numpy as np

SEQ = 24
TRUNK = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, intermediate_size=128, sliding_window=8, rope_theta=1e6, max_position_embeddings=64)


def tiny_hf_model(kind: str, seed: int = 0, **extra):
    """A random MistralForCausalLM ("mistral") or 4-expert top-2 MixtralForCausalLM, eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**TRUNK, **extra))
    else:
        model = transformers.MixtralForCausalLM(
            transformers.MixtralConfig(**TRUNK, num_local_experts=4, num_experts_per_tok=2, **extra))
    # Random init leaves norms at one; perturb them so a norm mix-up cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def random_tokens(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, TRUNK["vocab_size"], size=(2, SEQ)).astype(np.int32)
