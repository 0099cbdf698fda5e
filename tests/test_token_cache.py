"""Token caches (`mixtral-jax tokenize`, `data.source: tokens:DIR`): the same batches as the
on-the-fly pipeline, instruct masks kept, mixtures, and clear errors for another tokenizer and a
truncated or missing shard."""

import json
import random

import numpy as np
import pytest

from mixtral_jax import cli
from mixtral_jax.config import load_config
from mixtral_jax.data.pipeline import make_eval_batches, make_train_iterator
from mixtral_jax.data.token_cache import CacheError, TokenCache
from mixtral_jax.data.tokenize import build_cache
from mixtral_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer, train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_src")
    rng = random.Random(1)
    with open(root / "docs.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"doc{i} " + " ".join(rng.choices(WORDS, k=rng.randint(5, 120)))}) + "\n")
    with open(root / "chat.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"prompt": f"say {i} " + rng.choice(WORDS), "response": " ".join(rng.choices(WORDS, k=8))})
                    + "\n")
    return root


@pytest.fixture()
def cache_env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MIXTRAL_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "token_cache_env"))


def _cfg(source, *extra):
    return load_config("configs/quickstart.yaml", ["model.vocab_size=300", "data.seq_len=48", "data.batch_size=4",
                                                   f"data.source={source}", *extra])


def _same(a, b):
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("kind, pack", [("jsonl", "true"), ("jsonl", "false"), ("instruct", "true")])
def test_cache_gives_the_on_the_fly_batches(corpus, cache_env, tmp_path, capsys, kind, pack):
    source = f"{kind}:{corpus / ('docs.jsonl' if kind == 'jsonl' else 'chat.jsonl')}"
    out = tmp_path / "cache"
    assert cli.main(["tokenize", "--config", "configs/quickstart.yaml", "--out", str(out), "model.vocab_size=300",
                     f"data.source={source}"]) == 0
    assert f"data.source=tokens:{out}" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    live, cached = _cfg(source, f"data.pack={pack}"), _cfg(f"tokens:{out}", f"data.pack={pack}")
    tok = load_or_train_tokenizer(live.data, 300)
    assert load_or_train_tokenizer(cached.data, 300).fingerprint == tok.fingerprint == manifest["tokenizer"]["fingerprint"]
    assert manifest["masked"] == (kind == "instruct")
    a, b = make_train_iterator(live.data, tok, seed=2), make_train_iterator(cached.data, tok, seed=2)
    assert _same([next(a) for _ in range(40)], [next(b) for _ in range(40)])
    state = b.get_state()
    rest = [next(b) for _ in range(5)]
    again = make_train_iterator(cached.data, tok, seed=2)
    again.set_state(json.loads(json.dumps(state)))
    assert _same(rest, [next(again) for _ in range(5)])
    assert _same(make_eval_batches(live.data, tok, 2), make_eval_batches(cached.data, tok, 2))
    train = manifest["splits"]["train"]
    assert train["documents"] == len(TokenCache(out, "train")) and train["tokens"] > 0


def test_small_shards_and_a_mixture_cache(corpus, cache_env, tmp_path):
    cfg = load_config("configs/quickstart.yaml", [
        "model.vocab_size=300", "data.seq_len=48", "data.batch_size=4",
        f"data.mixture=[{{name: docs, source: 'jsonl:{corpus}/docs.jsonl', weight: 3}},"
        f" {{name: chat, source: 'instruct:{corpus}/chat.jsonl', weight: 1}}]"])
    tok = load_or_train_tokenizer(cfg.data, 300)
    lines = []
    build_cache(cfg.data, tok, tmp_path / "mix", shard_tokens=2000, say=lines.append)
    docs = json.loads((tmp_path / "mix" / "docs" / "manifest.json").read_text())
    assert len(docs["splits"]["train"]["shards"]) > 3  # several shards, read as one sequence
    assert "data.mixture=[{name: docs, source: 'tokens:" in lines[-1]
    cached = load_config("configs/quickstart.yaml", [
        "model.vocab_size=300", "data.seq_len=48", "data.batch_size=4",
        f"data.mixture=[{{name: docs, source: 'tokens:{tmp_path}/mix/docs', weight: 3}},"
        f" {{name: chat, source: 'tokens:{tmp_path}/mix/chat', weight: 1}}]"])
    a, b = make_train_iterator(cfg.data, tok, seed=0), make_train_iterator(cached.data, tok, seed=0)
    assert _same([next(a) for _ in range(30)], [next(b) for _ in range(30)])
    assert a.source_tokens == b.source_tokens
    with pytest.raises(CacheError, match="mixture's cache"):
        TokenCache(tmp_path / "mix", "train")


def test_another_tokenizer_and_damaged_shards_are_named(corpus, cache_env, tmp_path, capsys):
    source = f"jsonl:{corpus}/docs.jsonl"
    tok = load_or_train_tokenizer(_cfg(source).data, 300)
    out = tmp_path / "cache"
    build_cache(_cfg(source).data, tok, out, shard_tokens=3000, say=lambda _: None)
    other = train_tokenizer([f"other text {w} {i}" * 5 for i, w in enumerate(WORDS * 20)], 300, 100_000)
    other_path = other.save(tmp_path / "other.model")
    with pytest.raises(CacheError, match=f"{out}/manifest.json: the cache was built with another tokenizer"):
        load_or_train_tokenizer(_cfg(f"tokens:{out}", f"data.tokenizer.path={other_path}").data, 300)
    with pytest.raises(CacheError, match="another tokenizer"):
        make_train_iterator(_cfg(f"tokens:{out}").data, Tokenizer.from_file(other_path), seed=0)

    shard = out / "train" / "shard-00001.array_record"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated
    assert cli.main(["train", "--config", "configs/quickstart.yaml", "model.vocab_size=300",
                     f"data.source=tokens:{out}", f"run.out_dir={tmp_path}", "logging.progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"token cache shard {shard} has" in err and "truncated" in err
    shard.unlink()
    with pytest.raises(CacheError, match=f"token cache shard {shard} is missing"):
        TokenCache(out, "train")
    with pytest.raises(CacheError, match="manifest.json not found"):
        TokenCache(tmp_path / "nowhere", "train")
    (tmp_path / "notacache").mkdir()
    (tmp_path / "notacache" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a token cache"):
        build_cache(_cfg(source).data, tok, tmp_path / "notacache", say=lambda _: None)
    assert (tmp_path / "notacache" / "keep.txt").is_file()
