"""KV-cached decoding against the full forward, the rolling window buffer, sampling, generate()."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mixtral_jax.generate as gen
from mixtral_jax.config import load_config
from mixtral_jax.generate import generate, generate_text, sample_next
from mixtral_jax.models.transformer import Transformer

VOCAB = 128
SMALL = ["model.n_layers=2", f"model.vocab_size={VOCAB}", "model.dim=32", "model.hidden_dim=48",
         "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=8", "model.max_seq_len=64",
         "data.seq_len=64"]


def make(preset: str, window: int | None = 4, *overrides: str) -> Transformer:
    cfg = load_config(f"configs/model/{preset}.yaml",
                      [*SMALL, f"model.sliding_window={'null' if window is None else window}", *overrides]).model
    return Transformer(cfg, rngs=nnx.Rngs(0))


def forward(model: Transformer, tokens: jax.Array) -> np.ndarray:
    graphdef, state = nnx.split(model)
    logits, _ = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
    return np.asarray(logits)


def decoder(model: Transformer):
    """A jitted model.decode through split / merge (compiled once per chunk length)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c))
    return lambda tokens, positions, cache: fn(state, tokens, positions, cache)


def decode_all(model: Transformer, tokens: jax.Array, prefill: int, max_len: int):
    """Teacher-forced: prefill tokens[:, :prefill], then one token per step. Returns the logits
    at every position [B, T, V] and the final cache."""
    b, t = tokens.shape
    run = decoder(model)
    cache = model.init_cache(b, max_len)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = run(tokens[:, :prefill], pos[:, :prefill], cache)
    out = [np.asarray(logits)]
    for i in range(prefill, t):
        logits, cache = run(tokens[:, i:i + 1], pos[:, i:i + 1], cache)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1), cache


@pytest.mark.parametrize("preset,window,prefill,length", [
    ("tiny_dense", 4, 3, 12),  # decoding runs past the window: the buffer wraps
    ("tiny_moe", 4, 3, 12),  # dropless top-2 MoE
    ("tiny_dense", 4, 7, 12),  # a prefill chunk longer than the window
    ("tiny_dense", None, 3, 12),  # full attention: the cache holds every position
])
def test_cached_decode_matches_full_forward(preset, window, prefill, length):
    model = make(preset, window)
    tokens = jax.random.randint(jax.random.key(1), (2, length), 0, VOCAB)
    cached, cache = decode_all(model, tokens, prefill, max_len=length)
    # causal, so one full forward gives the logits of every prefix
    np.testing.assert_allclose(cached, forward(model, tokens), rtol=1e-5, atol=1e-5)
    slots = window if window is not None else length
    assert cache.k.shape == (2, 2, slots, 2, 8) and cache.k.dtype == jnp.float32
    assert cache.pos.shape == (2, 2, slots)


def test_prefill_longer_than_window_keeps_last_window():
    model = make("tiny_dense", 4)
    tokens = jax.random.randint(jax.random.key(2), (1, 7), 0, VOCAB)
    _, cache = decoder(model)(tokens, jnp.arange(7, dtype=jnp.int32)[None], model.init_cache(1, 100))
    # positions 3..6 at slots p % 4, in every layer
    np.testing.assert_array_equal(np.asarray(cache.pos), np.array([[[4, 5, 6, 3]]] * 2))


def test_rolling_cache_never_grows():
    model = make("tiny_dense", 4)
    run = decoder(model)
    cache = model.init_cache(1, 10_000)
    assert cache.k.shape == (2, 1, 4, 2, 8)
    assert (np.asarray(cache.pos) == -1).all()
    for p in range(30):
        _, cache = run(jnp.array([[p % VOCAB]]), jnp.array([[p]], jnp.int32), cache)
        assert cache.k.shape == cache.v.shape == (2, 1, 4, 2, 8) and cache.pos.shape == (2, 1, 4)
    pos = np.asarray(cache.pos)
    assert sorted(pos[0, 0]) == [26, 27, 28, 29]
    assert all(pos[0, 0, p % 4] == p for p in range(26, 30))
    np.testing.assert_array_equal(pos[0], pos[1])


# ---------------------------------------------------------------- sampling


def test_greedy_and_top_k_one_are_argmax():
    logits = jax.random.normal(jax.random.key(3), (16, 50)) * 3
    best = np.asarray(jnp.argmax(logits, -1))
    np.testing.assert_array_equal(np.asarray(sample_next(logits, jax.random.key(0), 0.0, 0, 1.0)), best)
    for i, temperature in enumerate([0.3, 1.0, 10.0]):
        ids = sample_next(logits, jax.random.key(i), temperature, 1, 1.0)
        np.testing.assert_array_equal(np.asarray(ids), best)


def test_top_k_restricts_to_k_best():
    logits = jnp.broadcast_to(jnp.array([0.0, 3.0, 1.0, 2.9, -1.0]), (4000, 5))
    ids = np.asarray(sample_next(logits, jax.random.key(4), 1.0, 2, 1.0))
    assert set(ids.tolist()) == {1, 3}


@pytest.mark.parametrize("top_p,nucleus", [(0.75, {0, 1}), (0.85, {0, 1, 2}), (0.1, {0}), (1.0, {0, 1, 2, 3})])
def test_top_p_samples_only_the_nucleus(top_p, nucleus):
    # Probabilities 0.5, 0.3, 0.15, 0.05 (shuffled in vocab order): cumulative 0.5, 0.8, 0.95, 1.
    probs = np.array([0.15, 0.5, 0.05, 0.3])
    rank = {1: 0, 3: 1, 0: 2, 2: 3}  # vocab index -> rank by probability
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (4000, 4))
    ids = np.asarray(sample_next(logits, jax.random.key(5), 1.0, 0, top_p))
    assert {rank[i] for i in ids.tolist()} == nucleus  # inside: all drawn; outside: never
    kept = np.array([p for i, p in enumerate(probs) if rank[i] in nucleus])
    for i in set(ids.tolist()):  # renormalised within the nucleus
        np.testing.assert_allclose(np.mean(ids == i), probs[i] / kept.sum(), atol=0.04)


def test_temperature_frequencies_follow_softmax():
    logits = jnp.array([1.0, 0.0, -0.5, 2.0, 0.5, -2.0])
    n = 40_000
    for temperature in (0.5, 2.0):
        ids = np.asarray(sample_next(jnp.broadcast_to(logits, (n, 6)), jax.random.key(6), temperature, 0, 1.0))
        freq = np.bincount(ids, minlength=6) / n
        expected = np.asarray(jax.nn.softmax(logits / temperature))
        # binomial std <= 0.0025 at n = 40k; 0.015 is six standard deviations (and the key is fixed)
        np.testing.assert_allclose(freq, expected, atol=0.015)


# ---------------------------------------------------------------- generate


def test_generate_greedy_matches_full_forward_and_stops():
    model = make("tiny_dense", 4)
    prompt = [1, 17, 42]
    step = gen._step_jit(jax.default_backend() != "cpu")
    compiled_before = step._cache_size()
    out = generate(model, prompt, max_new_tokens=12)
    assert len(out) == 12  # no eos_id: exactly max_new_tokens
    # every new token is the argmax of the full forward at the position before it
    logits = forward(model, jnp.asarray([prompt + out]))
    np.testing.assert_array_equal(np.argmax(logits[0, len(prompt) - 1:-1], -1), out)
    # stopping: eos is the first occurrence of a chosen token, included, nothing after it
    eos = out[5]
    assert generate(model, prompt, max_new_tokens=12, eos_id=eos) == out[:out.index(eos) + 1]
    assert generate(model, prompt, max_new_tokens=12, eos_id=out[0]) == out[:1]
    assert generate(model, prompt, max_new_tokens=3) == out[:3]
    assert generate(model, prompt, max_new_tokens=0) == []
    # one decode-step program for all of the above: the W-slot cache shape never changes
    assert step._cache_size() - compiled_before <= 1


def test_generate_sampling_is_seeded():
    model = make("tiny_dense", 4)
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, [1, 5], seed=1, **kw)
    assert a == generate(model, [1, 5], seed=1, **kw)
    assert all(0 <= t < VOCAB for t in a)


def test_generate_without_window_refuses_too_long():
    model = make("tiny_dense", None)  # max_seq_len 64
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, list(range(1, 41)), max_new_tokens=30)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, [1, 2, 3], max_new_tokens=10, max_len=8)
    assert len(generate(model, [1, 2, 3], max_new_tokens=4, max_len=64)) == 4
    # a sliding-window model has no such limit: its cache is W slots whatever the length
    assert len(generate(make("tiny_dense", 4), [1, 2], max_new_tokens=70)) == 70


def test_generate_text_wiring(tmp_path, monkeypatch):
    """generate_text: [BOS] + encode(prompt), stops at EOS, returns decoded new text only."""
    model = make("tiny_dense", 4)
    first = generate(model, [1, 9, 8], max_new_tokens=3)

    class FakeTokenizer:
        bos_id, eos_id = 1, first[1]

        def encode(self, text):
            return [int(c) for c in text]

        def decode(self, ids):
            return ",".join(str(i) for i in ids)

    seen = {}

    def fake_load(run_dir):
        seen["run_dir"] = run_dir
        return model, None, 0

    monkeypatch.setattr(gen, "load_run_model", fake_load)
    monkeypatch.setattr(gen, "load_tokenizer", lambda run_dir, cfg: FakeTokenizer())
    assert generate_text(tmp_path, "98", max_new_tokens=3) == str(first[0])
    assert seen["run_dir"] == tmp_path
    assert generate_text(str(tmp_path), "ignored", max_new_tokens=1, prompt_ids=[1, 9, 8]) == str(first[0])
    # chat=True: the prompt is the user turn of the instruct template, built by chat_prompt_ids
    chats = []
    monkeypatch.setattr(gen, "chat_prompt_ids",
                        lambda tok, text, system=None: chats.append((text, system)) or [1, 9, 8])
    assert generate_text(tmp_path, "98", max_new_tokens=1, chat=True, system="be brief") == str(first[0])
    assert chats == [("98", "be brief")]
