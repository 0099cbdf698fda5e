"""Data layer: corpus sources and splits, tokenizer, packing / batching / sharding / resume."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sysconfig
from pathlib import Path

import grain
import numpy as np
import pytest

from mixtral_jax.config import DataConfig, TokenizerConfig
from mixtral_jax.data import corpus, pipeline, sources
from mixtral_jax.data.tokenizer import load_or_train_tokenizer, unigram_entropy

BOS, EOS = 1, 2
TOK_VOCAB = 2048
TOK_BYTES = 2_000_000


class CharTokenizer:
    """Independent stand-in for packing tests: one token per ASCII character."""

    bos_id, eos_id, pad_id, unk_id, vocab_size = BOS, EOS, 0, 0, 131

    def encode(self, text: str) -> list[int]:
        return [ord(c) + 3 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(int(i) - 3) for i in ids)


def _write_jsonl(path: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]
    docs = [f"doc{i}: " + " ".join(rng.choice(words, size=int(rng.integers(1, 60))))
            for i in range(n)]
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return docs


@pytest.fixture()
def synth(tmp_path):
    """(config, documents) for a synthetic jsonl corpus with short and long documents."""
    docs = _write_jsonl(tmp_path / "c.jsonl", 300)
    cfg = DataConfig(source=f"jsonl:{tmp_path / 'c.jsonl'}", seq_len=32, batch_size=4)
    return cfg, docs


@pytest.fixture(scope="module")
def py_cfg(corpus_cache):
    return DataConfig(source="python_source", seq_len=64, batch_size=4,
                      tokenizer=TokenizerConfig(train_bytes=TOK_BYTES))


@pytest.fixture(scope="module")
def py_tok(py_cfg):
    return load_or_train_tokenizer(py_cfg, TOK_VOCAB)


def _documents_in(window: np.ndarray, tok) -> list[str]:
    """Unpack a token stream: the text of every complete [BOS] ... [EOS] span, in order."""
    pieces = np.split(window, np.flatnonzero(window == BOS))[1:]
    return [tok.decode(p[1:-1]) for p in pieces if len(p) >= 2 and p[-1] == EOS]


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


# ---------------------------------------------------------------- corpus


def _utf8_stdlib_files() -> set[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = set()
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel.split("/") or "dist-packages" in rel.split("/"):
            continue
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        out.add(rel)
    return out


def _paths(data_dir: Path, split: str) -> list[str]:
    import tensorflow_datasets as tfds

    src = tfds.data_source(f"{corpus.PYTHON_SOURCE_NAME}/{corpus.PYTHON_SOURCE_CONFIG}", split=split,
                           data_dir=str(data_dir), download=False)
    return [src[i]["path"].decode() for i in range(len(src))]


def test_python_source_split_by_file_disjoint_and_deterministic(py_cfg, tmp_path):
    train_docs = sources.load_documents(py_cfg, "train")
    data_dir = corpus.python_source_dir()
    train, val = _paths(data_dir, "train"), _paths(data_dir, "validation")
    assert len(train_docs) == len(train) and not set(train) & set(val)
    assert set(train) | set(val) == _utf8_stdlib_files()  # every UTF-8 stdlib file, no site-packages
    assert 0.01 < len(val) / (len(train) + len(val)) < 0.06
    for path in val:  # the split rule, recomputed independently
        assert int.from_bytes(hashlib.blake2b(path.encode(), digest_size=8).digest(), "big") % 10_000 < 300
    # A second build from scratch gives the same files in the same order.
    other = corpus.build_python_source(tmp_path / "again")
    assert _paths(other, "train") == train and _paths(other, "validation") == val
    root = Path(sysconfig.get_paths()["stdlib"])
    assert train_docs[0] == (root / train[0]).read_text(encoding="utf-8")


def test_tfds_source_reads_prepared_dataset(py_cfg, monkeypatch):
    corpus.build_python_source()
    monkeypatch.setenv("TFDS_DATA_DIR", str(corpus.python_source_dir()))
    cfg = DataConfig(source=f"tfds:{corpus.PYTHON_SOURCE_NAME}/{corpus.PYTHON_SOURCE_CONFIG}")
    val = sources.load_documents(cfg, "validation")
    assert list(val) == list(sources.load_documents(py_cfg, "validation"))
    with pytest.raises(ValueError, match="no feature 'body'"):
        sources.load_documents(DataConfig(source=cfg.source, text_key="body"), "train")
    with pytest.raises(ValueError, match="unknown tfds dataset"):
        sources.load_documents(DataConfig(source="tfds:no_such_dataset_xyz"), "train")


def test_tfds_source_without_validation_split_is_carved_by_index(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    class MixtralJaxTestTrainOnly(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None  # see corpus.py: no checksum lookup next to this module

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"body": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(400):
                yield i, {"body": f"record {i}"}

    MixtralJaxTestTrainOnly(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    cfg = DataConfig(source="tfds:mixtral_jax_test_train_only", text_key="body")
    train, val = list(sources.load_documents(cfg, "train")), list(sources.load_documents(cfg, "validation"))
    assert sorted(train + val) == sorted(f"record {i}" for i in range(400)) and not set(train) & set(val)
    assert 2 <= len(val) <= 30
    assert val == list(sources.load_documents(cfg, "validation"))


def test_jsonl_skips_bad_lines_with_counts(tmp_path, caplog):
    good = [f"document number {i}" for i in range(40)]
    lines = [json.dumps({"text": t}) for t in good[:20]] + ['{"text": broken', json.dumps({"other": "x"}), ""]
    lines += [json.dumps({"text": t}) for t in good[20:]]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source=f"jsonl:{tmp_path / 'a.jsonl'}")
    with caplog.at_level(logging.WARNING):
        train = list(sources.load_documents(cfg, "train"))
    assert "skipped 1 line(s) of invalid JSON and 1 record(s)" in caplog.text
    val = list(sources.load_documents(cfg, "validation"))
    assert sorted(train + val) == sorted(good) and val and not set(train) & set(val)
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="no usable records.*'text'"):
        sources.load_documents(DataConfig(source=f"jsonl:{tmp_path / 'bad.jsonl'}"), "train")
    with pytest.raises(ValueError, match="no such file"):
        sources.load_documents(DataConfig(source=f"jsonl:{tmp_path / 'missing*.jsonl'}"), "train")


def test_text_dir_skips_binary_and_non_utf8(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "sub" / "b.py").write_text("def f():\n    return 1\n")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "nul.txt").write_bytes(b"abc\x00def")
    cfg = DataConfig(source=f"text:{tmp_path}")
    with caplog.at_level(logging.WARNING):
        docs = list(sources.load_documents(cfg, "train")) + list(sources.load_documents(cfg, "validation"))
    assert sorted(docs) == ["def f():\n    return 1\n", "hello world\n"]
    assert "skipped 3 binary or non-UTF-8 file(s)" in caplog.text


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_python_and_uses_byte_fallback(py_cfg, py_tok):
    assert (py_tok.vocab_size, py_tok.unk_id, py_tok.bos_id, py_tok.eos_id, py_tok.pad_id) == (TOK_VOCAB, 0, 1, 2, 0)
    val = sources.load_documents(py_cfg, "validation")
    for i in range(0, len(val), max(1, len(val) // 20)):  # held-out files: unseen by the trainer
        assert py_tok.decode(py_tok.encode(val[i])) == val[i]
    for text in ["    x = 1\n\n\n\tif y:  \n        pass  # trailing  ", " lead", "a\r\nb", "12345678"]:
        assert py_tok.decode(py_tok.encode(text)) == text
    assert [py_tok.id_to_piece(i) for i in py_tok.encode("12")] == ["1", "2"]  # split_digits
    for text in ["日本語のテキスト", "emoji 🙂🚀", "naïve façade"]:
        ids = py_tok.encode(text)
        assert py_tok.decode(ids) == text and 0 not in ids  # no unk: bytes instead
    pieces = [py_tok.id_to_piece(i) for i in py_tok.encode("🚀")]
    assert pieces == [f"<0x{b:02X}>" for b in "🚀".encode()]


def test_tokenizer_is_cached_and_picklable(py_cfg, py_tok):
    import pickle

    mtime = os.stat(py_tok.path).st_mtime_ns
    again = load_or_train_tokenizer(py_cfg, TOK_VOCAB)
    assert again.path == py_tok.path and os.stat(py_tok.path).st_mtime_ns == mtime
    clone = pickle.loads(pickle.dumps(py_tok))
    assert clone.encode("def f(x): return x") == py_tok.encode("def f(x): return x")


def test_tokenizer_path_errors(py_tok, tmp_path):
    path = py_tok.save(tmp_path / "tok.model")
    cfg = DataConfig(tokenizer=TokenizerConfig(path=str(path)))
    assert load_or_train_tokenizer(cfg, TOK_VOCAB).vocab_size == TOK_VOCAB
    with pytest.raises(ValueError, match=f"{TOK_VOCAB} pieces but model.vocab_size is 4096"):
        load_or_train_tokenizer(cfg, 4096)
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_or_train_tokenizer(DataConfig(tokenizer=TokenizerConfig(path=str(tmp_path / "nope.model"))), 8)


def test_unigram_entropy():
    assert unigram_entropy([5, 5, 5]) == 0.0
    assert math.isclose(unigram_entropy(np.array([[1, 2], [3, 4]])), math.log(4))
    p = np.array([0.5, 0.25, 0.25])
    assert math.isclose(unigram_entropy([np.array([7, 7]), [8], np.array([9])]), float(-(p * np.log(p)).sum()))


# ---------------------------------------------------------------- packing and batching


def _reference_rows(docs, order, length, n_rows):
    """Plain-python concat-and-split of [BOS] doc [EOS] for the documents in `order`."""
    flat, owner = [], []
    for k, index in enumerate(order):
        toks = [BOS] + [ord(c) + 3 for c in docs[index]] + [EOS]
        flat += toks
        owner += [k] * len(toks)
        if len(flat) >= length * n_rows:
            break
    rows = []
    for r in range(n_rows):
        toks, own = flat[r * length:(r + 1) * length], owner[r * length:(r + 1) * length]
        seg, pos = [], []
        for t in range(length):
            new = t == 0 or own[t] != own[t - 1]
            seg.append(1 if t == 0 else seg[-1] + new)
            pos.append(0 if new else pos[-1] + 1)
        mask = [float(seg[t] == seg[t + 1]) for t in range(length - 1)]
        rows.append((toks, seg, pos, mask))
    return rows


def test_packing_matches_reference(synth):
    cfg, _ = synth
    tok, seed, n = CharTokenizer(), 3, 40
    docs = list(sources.load_documents(cfg, "train"))
    batches = _take(pipeline.make_train_iterator(cfg, tok, seed=seed), n)
    T, B = cfg.seq_len, cfg.batch_size
    for b in batches:
        assert {k: (v.shape, v.dtype.name) for k, v in b.items()} == {
            "inputs": ((B, T), "int32"), "targets": ((B, T), "int32"), "segment_ids": ((B, T), "int32"),
            "positions": ((B, T), "int32"), "loss_mask": ((B, T), "float32")}
        assert np.array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        assert (b["segment_ids"] > 0).all()  # training rows are full: no padding
        assert (b["loss_mask"][b["targets"] == EOS] == 1).all()  # the end of a document is predicted
        assert (b["loss_mask"][b["targets"] == BOS] == 0).all()  # the next document is not
        assert (b["positions"][b["inputs"] == BOS] == 0).all()
    # Row r of consecutive batches is stream r: documents r, r+B, ... of the shuffled order.
    order = list(grain.MapDataset.range(len(docs)).shuffle(seed=seed).repeat(None)[: 40 * B])
    for r in range(B):
        ref = _reference_rows(docs, order[r::B], T + 1, n)
        for b, (toks, seg, pos, mask) in zip(batches, ref):
            assert b["inputs"][r].tolist() + [int(b["targets"][r, -1])] == toks
            assert b["segment_ids"][r].tolist() == seg[:-1] and b["positions"][r].tolist() == pos[:-1]
            assert b["loss_mask"][r].tolist() == mask
    # Unpacking: the segments of one stream, joined, decode to its documents in order.
    window = np.concatenate([np.concatenate([b["inputs"][0], b["targets"][0, -1:]]) for b in batches])
    parts = _documents_in(window, tok)
    assert parts == [docs[i] for i in order[0::B][:len(parts)]] and len(parts) >= 2


def test_seed_determinism(synth):
    cfg, _ = synth
    tok = CharTokenizer()
    a = _take(pipeline.make_train_iterator(cfg, tok, seed=0), 5)
    assert _same(a, _take(pipeline.make_train_iterator(cfg, tok, seed=0), 5))
    assert not _same(a, _take(pipeline.make_train_iterator(cfg, tok, seed=1), 5))


@pytest.mark.parametrize("k", [0, 1, 7])
def test_state_restore_resumes_exactly(synth, k):
    cfg, _ = synth
    tok = CharTokenizer()
    it = pipeline.make_train_iterator(cfg, tok, seed=5)
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint would store it
    expected = _take(it, 6)
    fresh = pipeline.make_train_iterator(cfg, tok, seed=5)
    fresh.set_state(state)
    assert _same(_take(fresh, 6), expected)
    with pytest.raises(ValueError, match="seed: 5 -> 6"):  # another pipeline's state is refused
        pipeline.make_train_iterator(cfg, tok, seed=6).set_state(state)


def test_shards_together_are_the_global_batch(synth):
    cfg, _ = synth
    tok = CharTokenizer()
    whole = _take(pipeline.make_train_iterator(cfg, tok, seed=2), 6)
    parts = [_take(pipeline.make_train_iterator(cfg, tok, seed=2, shard_index=i, shard_count=2), 6)
             for i in range(2)]
    for g, a, b in zip(whole, *parts):
        assert a["inputs"].shape[0] == cfg.batch_size // 2
        assert all(np.array_equal(g[k], np.concatenate([a[k], b[k]])) for k in g)
    with pytest.raises(ValueError, match="divisible"):
        pipeline.make_train_iterator(cfg, tok, seed=2, shard_index=0, shard_count=3)


def test_no_packing_keeps_one_document_per_row(synth):
    cfg, _ = synth
    cfg.pack = False
    for b in _take(pipeline.make_train_iterator(cfg, CharTokenizer(), seed=0), 5):
        assert b["segment_ids"].max(axis=1).tolist() == [1] * cfg.batch_size
        padded = b["segment_ids"] == 0
        assert (b["loss_mask"][padded] == 0).all() and (b["inputs"][padded] == 0).all()


def test_eval_batches_are_fixed_and_cover_validation(synth):
    cfg, _ = synth
    tok = CharTokenizer()
    val = list(sources.load_documents(cfg, "validation"))
    a = pipeline.make_eval_batches(cfg, tok, 1000)  # more than there is: every row, in order
    assert _same(a, pipeline.make_eval_batches(cfg, tok, 1000)) and 0 < len(a) < 1000
    rows = [np.concatenate([b["inputs"][r], b["targets"][r, -1:]]) for b in a for r in range(cfg.batch_size)]
    stream = np.concatenate(rows)
    assert sorted(_documents_in(stream[stream != 0], tok)) == sorted(val)  # each held-out doc, whole, once
    last = a[-1]
    assert (last["loss_mask"][last["segment_ids"] == 0] == 0).all()
    # Fewer batches: an evenly spaced subset of those rows (many documents, not the first few).
    real = [r for r in rows if r.any()]
    few = pipeline.make_eval_batches(cfg, tok, 2)
    stride = len(real) // (2 * cfg.batch_size)
    expected = real[::stride][: 2 * cfg.batch_size]
    got = [np.concatenate([b["inputs"][r], b["targets"][r, -1:]]) for b in few for r in range(cfg.batch_size)]
    assert stride > 1 and len(got) == len(expected) and all(np.array_equal(x, y) for x, y in zip(got, expected))
    halves = [pipeline.make_eval_batches(cfg, tok, 2, shard_index=i, shard_count=2) for i in range(2)]
    assert all(np.array_equal(f[k], np.concatenate([h0[k], h1[k]]))
               for f, h0, h1 in zip(few, *halves) for k in f)


def test_python_source_batches_with_real_tokenizer(py_cfg, py_tok):
    docs = sources.load_documents(py_cfg, "train")
    b = next(pipeline.make_train_iterator(py_cfg, py_tok, seed=0))
    assert b["inputs"].max() < TOK_VOCAB and b["inputs"][0, 0] == BOS
    first = int(grain.MapDataset.range(len(docs)).shuffle(seed=0)[0])
    expected = py_tok.encode(docs[first])[: py_cfg.seq_len]
    assert b["targets"][0].tolist()[: len(expected)] == expected
    ev = pipeline.make_eval_batches(py_cfg, py_tok, 2)
    assert len(ev) == 2 and float(ev[0]["loss_mask"].mean()) > 0.9


def test_worker_processes_give_the_same_batches(synth):
    cfg, _ = synth
    tok = CharTokenizer()
    expected = _take(pipeline.make_train_iterator(cfg, tok, seed=4), 8)
    cfg.num_workers = 2
    it = pipeline.make_train_iterator(cfg, tok, seed=4)
    try:
        got = _take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        got += _take(it, 5)
    finally:
        it.close()
    assert _same(got, expected)
    resumed = pipeline.make_train_iterator(cfg, tok, seed=4)
    try:
        resumed.set_state(state)
        assert _same(_take(resumed, 5), expected[3:])
    finally:
        resumed.close()


def test_heldout_unigram_entropy_matches_direct_count(synth):
    cfg, _ = synth
    tok = CharTokenizer()
    tokens = [t for d in sources.load_documents(cfg, "validation") for t in tok.encode(d) + [EOS]]
    counts = np.unique(tokens, return_counts=True)[1]
    p = counts / counts.sum()
    assert math.isclose(pipeline.heldout_unigram_entropy(cfg, tok), float(-(p * np.log(p)).sum()))


def test_token_spans_cover_the_text(corpus_cache):
    """encode_with_spans: the ids are encode()'s, and each token's span is the text it stands for."""
    from mixtral_jax.config import load_config
    from mixtral_jax.data.tokenizer import load_or_train_tokenizer

    cfg = load_config("configs/quickstart.yaml")
    tokenizer = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)
    text = "def f(x):\n    return x + 1  # plus one\n"
    ids, spans = tokenizer.encode_with_spans(text)
    assert ids == tokenizer.encode(text)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a <= b == c for (a, b), (c, _) in zip(spans, spans[1:]))  # contiguous, in order
    assert "".join(text[a:b] for a, b in spans) == text
    assert any(text[a:b].strip() == "return" for a, b in spans)
