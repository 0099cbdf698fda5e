"""Data mixtures (data.mixture): token shares follow the weights, exact resume, new weights on
resume, per-source metrics in a tiny training run, and the config errors."""

import json
import random

import numpy as np
import pytest

from mixtral_jax.config import ConfigError, load_config
from mixtral_jax.data.mixture import pick_source, weights_note
from mixtral_jax.data.pipeline import make_eval_sets, make_train_iterator
from mixtral_jax.data.tokenizer import load_or_train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two JSONL sources whose documents differ ~15x in length (so document shares and
    token shares differ a lot), and a text-file source."""
    root = tmp_path_factory.mktemp("mixture")
    rng = random.Random(0)
    with open(root / "short.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"s{i} " + " ".join(rng.choices(WORDS, k=rng.randint(3, 15)))}) + "\n")
    with open(root / "long.jsonl", "w") as f:
        for i in range(120):
            f.write(json.dumps({"text": f"L{i} " + " ".join(rng.choices(WORDS, k=rng.randint(60, 200)))}) + "\n")
    (root / "books").mkdir()
    for i in range(40):
        (root / "books" / f"{i}.txt").write_text(f"book {i}\n" + " ".join(rng.choices(WORDS, k=rng.randint(20, 80))))
    return root


@pytest.fixture()
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MIXTRAL_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "mixture_cache"))


def _mixture(root, short=0.7, long=0.3, books=None) -> str:
    entries = [f'{{name: short, source: "jsonl:{root}/short.jsonl", weight: {short}}}',
               f'{{name: long, source: "jsonl:{root}/long.jsonl", weight: {long}}}']
    if books is not None:
        entries.append(f'{{name: books, source: "text:{root}/books", weight: {books}}}')
    return "data.mixture=[" + ", ".join(entries) + "]"


def _cfg(root, *extra, mixture=None):
    return load_config("configs/quickstart.yaml", [
        "model.vocab_size=300", "data.seq_len=64", "data.batch_size=4", mixture or _mixture(root), *extra])


def _shares(counts: dict) -> dict:
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()}


def test_token_shares_follow_the_weights(sources, cache):
    cfg = _cfg(sources, mixture=_mixture(sources, 0.5, 0.2, books=0.3))
    tok = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)
    it = make_train_iterator(cfg.data, tok, seed=3)
    for _ in range(1000):
        batch = next(it)
    assert "source_ids" not in batch  # stripped before the trainer sees the batch
    assert sum(it.source_tokens.values()) == 1000 * 4 * 64  # packed: no padding
    shares = _shares(it.source_tokens)
    for name, weight in (("short", 0.5), ("long", 0.2), ("books", 0.3)):
        assert abs(shares[name] - weight) < 0.01, shares


def test_scheduler_and_note():
    taken = [0, 0]
    for length in [10, 1000, 10, 10, 1000] * 200:  # the pick does not depend on document lengths
        k = pick_source(taken, [0.25, 0.75])
        taken[k] += length if k else length // 10
    assert abs(taken[1] / sum(taken) - 0.75) < 0.01
    cfg = load_config("configs/quickstart.yaml", ["data.mixture=[{name: a, source: python_source, weight: 3},"
                                                   " {name: b, source: 'jsonl:x', weight: 1}]"])
    assert weights_note(cfg.data.mixture) == "note: data.mixture weights sum to 4, normalised to a 0.75, b 0.25"


def test_resume_is_exact_and_new_weights_are_noted(sources, cache):
    cfg = _cfg(sources)
    tok = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)
    straight = make_train_iterator(cfg.data, tok, seed=1)
    first = [next(straight) for _ in range(37)]
    state = json.loads(json.dumps(straight.get_state()))  # what the checkpoint stores
    rest = [next(straight) for _ in range(20)]
    resumed = make_train_iterator(cfg.data, tok, seed=1)
    resumed.set_state(state)
    again = [next(resumed) for _ in range(20)]
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(rest, again) for k in a)
    assert resumed.source_tokens == straight.source_tokens and not resumed.notes
    assert first[0]["inputs"].shape == (4, 64)

    # New weights resume the same position, say so, and the shares from there follow them.
    reweighted = _cfg(sources, mixture=_mixture(sources, 0.2, 0.8))
    moved = make_train_iterator(reweighted.data, tok, seed=1)
    moved.set_state(state)
    assert moved.notes and "short 0.7 -> 0.2" in moved.notes[0]
    before = dict(moved.source_tokens)
    for _ in range(600):
        next(moved)
    since = {k: moved.source_tokens[k] - before[k] for k in before}
    assert abs(_shares(since)["long"] - 0.8) < 0.01, since

    other = make_train_iterator(_cfg(sources, mixture=_mixture(sources).replace("name: long", "name: lng")).data,
                                tok, seed=1)
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(state)


def test_eval_sets_per_source(sources, cache):
    cfg = _cfg(sources)
    tok = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)
    sets = make_eval_sets(cfg.data, tok, 2)
    assert list(sets) == ["short", "long"] and all(len(b) >= 1 for b in sets.values())
    assert "source_ids" not in sets["short"][0]


@pytest.mark.parametrize("override, key", [
    ("data.mixture=[{name: a, source: '', weight: 1}]", "data.mixture[0].source"),
    ("data.mixture=[{name: a, source: python_source, weight: 0}]", "data.mixture[0].weight"),
    ("data.mixture=[{name: a, source: python_source, weight: -1}]", "data.mixture[0].weight"),
    ("data.mixture=[{name: a, source: python_source}, {name: a, source: 'jsonl:x'}]", "data.mixture[1].name"),
    ("data.mixture=[{name: '', source: python_source}]", "data.mixture[0].name"),
    ("data.mixture=[{name: a, source: 'nope:x'}]", "data.mixture[0].source"),
])
def test_bad_mixtures_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key.replace('[', '.').replace(']', '.')}"):
        load_config("configs/quickstart.yaml", [override])


def test_mixture_and_source_both_set_is_refused():
    with pytest.raises(ConfigError, match="config key 'data.source'.*data.mixture"):
        load_config("configs/quickstart.yaml", ["data.source=jsonl:x", "data.mixture=[{name: a, source: python_source}]"])
    # weights not summing to 1 are normalised, not refused
    load_config("configs/quickstart.yaml", ["data.mixture=[{name: a, source: python_source, weight: 5}]"])


def test_training_logs_per_source_tokens_and_eval(sources, cache, tmp_path, capfd):
    from mixtral_jax.training.metrics import read_metrics
    from mixtral_jax.training.trainer import Trainer

    small = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
             "model.hidden_dim=64", "model.moe.num_experts=2", "model.moe.top_k=1", "data.seq_len=32",
             "data.batch_size=8", "train.steps=4", "train.eval_every=2", "train.log_every=2", "train.checkpoint_every=2",
             "train.eval_batches=1", "logging.progress=false", "logging.wandb=off", f"run.out_dir={tmp_path}",
             "run.name=mix"]
    cfg = _cfg(sources, *small)
    Trainer(cfg).fit(stop_at=2)
    resumed = _cfg(sources, *small, mixture=_mixture(sources, 0.5, 0.5))  # new weights: allowed, noted
    summary = Trainer(resumed).fit()
    records = read_metrics(cfg.run_dir)
    logged = [r for r in records if "data/tokens/short" in r]
    assert [r["step"] for r in logged] == [2, 4]
    assert logged[-1]["data/tokens/short"] + logged[-1]["data/tokens/long"] == 4 * 8 * 32
    evals = [r for r in records if "eval_loss" in r]
    assert all("eval_loss/short" in r and "eval_loss/long" in r for r in evals) and len(evals) == 2
    last = evals[-1]
    assert last["eval_loss"] == pytest.approx(0.5 * last["eval_loss/short"] + 0.5 * last["eval_loss/long"])
    assert summary["eval_loss"] == pytest.approx(last["eval_loss"])
    from mixtral_jax.training.evaluate import evaluate_run

    verb = evaluate_run(cfg.run_dir, 1)  # `mixtral-jax eval` reports the sources too
    assert {"eval_loss/short", "eval_loss/long"} <= set(verb) and verb["eval_tokens"] > 0
    assert verb["eval_loss"] == pytest.approx(0.5 * verb["eval_loss/short"] + 0.5 * verb["eval_loss/long"])
    printed = capfd.readouterr()
    assert "data.mixture weights changed on resume (short 0.7 -> 0.5, long 0.3 -> 0.5)" in printed.out + printed.err
