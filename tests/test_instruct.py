"""Instruction data: the instruct:PATH source, the Mistral v1 template, response-only loss."""

from __future__ import annotations

import io
import json
import logging
import math

import grain
import numpy as np
import pytest
import sentencepiece as spm

from mixtral_jax.config import DataConfig
from mixtral_jax.data import pipeline, sources
from mixtral_jax.data.instruct import chat_prompt_ids, encode_conversation, render_text
from mixtral_jax.data.tokenizer import Tokenizer, train_tokenizer, unigram_entropy

BOS, EOS = 1, 2
WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa", "what", "is"]


class CharTokenizer:
    """One token per character (no piece_id: the markers are encoded as text), so a
    plain-Python reference can tokenize any concatenation of strings."""

    bos_id, eos_id, pad_id, unk_id, vocab_size = BOS, EOS, 0, 0, 131

    def encode(self, text: str) -> list[int]:
        return [ord(c) + 3 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(int(i) - 3) for i in ids)


def _spm_tokenizer(user_defined: tuple[str, ...] = (), dummy_prefix: bool = False) -> Tokenizer:
    """A tiny BPE model with the project's conventions, optionally with user-defined pieces
    or (like Mistral's own tokenizer.model) a dummy "▁" prefix."""
    rng = np.random.default_rng(0)
    sentences = [f"[INST] {' '.join(rng.choice(WORDS, 8))}? [/INST] {' '.join(rng.choice(WORDS, 10))}."
                 for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=400,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        hard_vocab_limit=False, user_defined_symbols=list(user_defined), num_threads=1, minloglevel=2)
    return Tokenizer(model.getvalue())


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    return {"text": _spm_tokenizer(), "pieces": _spm_tokenizer(("[INST]", "[/INST]")),
            "dummy": _spm_tokenizer(dummy_prefix=True)}


# ---------------------------------------------------------------- template


ONE = [("user", "What is BPE?"), ("assistant", "A subword tokenizer.")]
MULTI = ONE + [("user", "And unigram?"), ("assistant", "Another one.")]
SYSTEM = [("system", "Be brief.")] + ONE


def _expected(tok: Tokenizer, kind: str, name: str) -> tuple[list[int], list[int], str]:
    """Hand-written layout: (ids, mask, decoded text) of the ONE / MULTI / SYSTEM examples."""
    if kind == "pieces":  # looked up in the model itself, not through Tokenizer.piece_id
        sp = spm.SentencePieceProcessor(model_proto=tok.model_proto)
        inst, end = [sp.piece_to_id("[INST]")], [sp.piece_to_id("[/INST]")]
    else:
        inst, end = tok.encode("[INST]"), tok.encode("[/INST]")
    user1 = " Be brief.\n\nWhat is BPE? " if name == "system" else " What is BPE? "
    ids = [BOS] + inst + tok.encode(user1) + end
    mask = [0] * len(ids)
    answer = tok.encode(" A subword tokenizer.") + [EOS]
    ids, mask = ids + answer, mask + [1] * len(answer)
    text = f"[INST]{user1}[/INST] A subword tokenizer."
    if name == "multi":
        prompt = inst + tok.encode(" And unigram? ") + end
        answer = tok.encode(" Another one.") + [EOS]
        ids, mask = ids + prompt + answer, mask + [0] * len(prompt) + [1] * len(answer)
        text += "[INST] And unigram? [/INST] Another one."
    return ids, mask, text


@pytest.mark.parametrize("kind", ["text", "pieces"])
@pytest.mark.parametrize("name,turns", [("one", ONE), ("multi", MULTI), ("system", SYSTEM)])
def test_template_layout_and_mask(toks, kind, name, turns):
    tok = toks[kind]
    ids, mask = encode_conversation(tok, turns)
    want_ids, want_mask, text = _expected(tok, kind, name)
    assert ids.dtype == np.int32 and mask.dtype == np.float32
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    assert tok.decode(ids) == text == render_text(tuple(turns))
    # Exactly the assistant tokens and their EOS are targets; every EOS is one.
    assert int(mask.sum()) == sum(len(tok.encode(f" {c}")) + 1 for r, c in turns if r == "assistant")
    assert (mask[ids == EOS] == 1).all() and mask[0] == 0
    # Generation prompt: the conversation up to (and including) the first [/INST].
    prompt = chat_prompt_ids(tok, "What is BPE?", system="Be brief." if name == "system" else None)
    assert prompt == want_ids[: mask.tolist().index(1)]


@pytest.mark.parametrize("name,turns", [("one", ONE), ("multi", MULTI), ("system", SYSTEM)])
def test_dummy_prefix_tokenizer_matches_mistral_common_v1(toks, name, turns):
    """Mistral's tokenizer.model prepends "▁" to each encode; mistral-common's v1 encoder
    then gives encode("[INST] {user} [/INST]") + encode("{answer}") + [EOS] per turn."""
    tok = toks["dummy"]
    assert tok.adds_dummy_prefix and not toks["text"].adds_dummy_prefix
    user1 = "Be brief.\n\nWhat is BPE?" if name == "system" else "What is BPE?"
    prompt = [BOS] + tok.encode(f"[INST] {user1} [/INST]")
    answer = tok.encode("A subword tokenizer.") + [EOS]
    want_ids, want_mask = prompt + answer, [0] * len(prompt) + [1] * len(answer)
    if name == "multi":
        prompt, answer = tok.encode("[INST] And unigram? [/INST]"), tok.encode("Another one.") + [EOS]
        want_ids += prompt + answer
        want_mask += [0] * len(prompt) + [1] * len(answer)
    ids, mask = encode_conversation(tok, turns)
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    assert "\u2581\u2581" not in "".join(map(tok.id_to_piece, ids))  # no doubled spaces
    assert chat_prompt_ids(tok, "What is BPE?", "Be brief." if name == "system" else None) == \
        [BOS] + tok.encode(f"[INST] {user1} [/INST]")


def test_user_defined_markers_are_single_pieces(toks):
    plain, pieces = toks["text"], toks["pieces"]
    assert plain.piece_id("[INST]") is None and len(plain.encode("[INST]")) > 1
    sp = spm.SentencePieceProcessor(model_proto=pieces.model_proto)
    assert pieces.piece_id("[INST]") == sp.piece_to_id("[INST]") > 2
    assert pieces.piece_id("[/INST]") == sp.piece_to_id("[/INST]") != pieces.piece_id("[INST]")
    assert pieces.piece_id("<s>") == BOS and pieces.piece_id("<unk>") == 0
    ids, _ = encode_conversation(pieces, ONE)
    assert ids[1] == pieces.piece_id("[INST]") and pieces.piece_id("[/INST]") in ids.tolist()
    assert len(ids) < len(encode_conversation(plain, ONE)[0])


@pytest.mark.parametrize("turns", [[], [("assistant", "x")], [("user", "a")], [("user", "a"), ("user", "b")],
                                   [("system", "s")], [("user", "a"), ("assistant", "")],
                                   [("user", "a"), ("assistant", 3)], [("bot", "a"), ("assistant", "b")]])
def test_invalid_conversations_are_refused(turns):
    with pytest.raises(ValueError, match="not a valid conversation"):
        encode_conversation(CharTokenizer(), turns)


# ---------------------------------------------------------------- the instruct:PATH source


def test_bad_lines_are_skipped_and_counted(tmp_path, caplog):
    good = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(30)]
    good.append({"prompt": "q", "response": "a", "system": "sys"})
    good.append({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                              {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                              {"role": "assistant", "content": "a2"}], "id": 7})
    bad = ["not json", json.dumps({"prompt": "only a prompt"}), json.dumps({"prompt": 3, "response": "r"}),
           json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}),
           json.dumps({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                                    {"role": "user", "content": "u"}]}),
           json.dumps({"messages": [{"role": "bot", "content": "u"}]}), json.dumps(["a", "list"]),
           json.dumps({"prompt": "p", "response": "r", "system": 5})]
    lines = [json.dumps(g) for g in good[:10]] + bad + [""] + [json.dumps(g) for g in good[10:]]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source=f"instruct:{path}")
    with caplog.at_level(logging.WARNING):
        train = list(sources.load_documents(cfg, "train"))
    assert f"skipped {len(bad)} unusable line(s); first at {path}:11: invalid JSON" in caplog.text
    val = list(sources.load_documents(cfg, "validation"))
    expected = [(("user", f"question {i}?"), ("assistant", f"answer {i}.")) for i in range(30)]
    expected += [(("system", "sys"), ("user", "q"), ("assistant", "a")),
                 (("system", "s"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"))]
    assert sorted(train + val) == sorted(expected) and val and train and not set(train) & set(val)
    assert train == [c for c in expected if c in train]  # file order kept
    assert sources.source_fingerprint(cfg) == f"instruct:{path}#text"

    (tmp_path / "all_bad.jsonl").write_text("\n".join(bad) + "\n")
    with pytest.raises(ValueError, match=r"no usable conversations in .*all_bad\.jsonl .*8 line\(s\)"):
        sources.load_documents(DataConfig(source=f"instruct:{tmp_path / 'all_bad.jsonl'}"), "train")
    with pytest.raises(ValueError, match="no such file"):
        sources.load_documents(DataConfig(source=f"instruct:{tmp_path / 'nope*.jsonl'}"), "train")


# ---------------------------------------------------------------- packing and batching


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(1, k))))

    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"prompt": f"q{i} {words(12)}", "response": words(20)})
        elif i % 3 == 1:
            out.append({"prompt": f"q{i} {words(6)}", "response": words(8), "system": words(5)})
        else:
            msgs = [("user", f"q{i} {words(5)}"), ("assistant", words(10)), ("user", words(5)),
                    ("assistant", words(15))]
            out.append({"messages": [{"role": r, "content": c} for r, c in msgs]})
    return out


def _reference(record: dict) -> tuple[tuple, list[int], list[bool]]:
    """Plain-Python template of a raw JSONL record: (conversation, char tokens, is-target)."""
    if "messages" in record:
        turns = [(m["role"], m["content"]) for m in record["messages"]]
    else:
        turns = ([("system", record["system"])] if "system" in record else [])
        turns += [("user", record["prompt"]), ("assistant", record["response"])]
    key = tuple(turns)
    if turns[0][0] == "system":
        turns = [("user", turns[0][1] + "\n\n" + turns[1][1])] + turns[2:]
    ids, target = [BOS], [False]
    for role, text in turns:
        piece = f"[INST] {text} [/INST]" if role == "user" else f" {text}"
        ids += [ord(c) + 3 for c in piece] + ([EOS] if role == "assistant" else [])
        target += [role == "assistant"] * (len(piece) + (role == "assistant"))
    return key, ids, target


@pytest.fixture()
def chats(tmp_path):
    records = _records(240)
    half = len(records) // 2  # two files: the source is a glob
    for name, part in (("a", records[:half]), ("b", records[half:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = DataConfig(source=f"instruct:{tmp_path}/*.jsonl", seq_len=48, batch_size=4)
    return cfg, {key: (ids, target) for key, ids, target in map(_reference, records)}


def _reference_rows(encoded: list[tuple[list[int], list[bool]]], length: int, pack: bool, n_rows: int):
    """Rows of (tokens, owner, is-target): concat-and-split (pack) or one document per row
    split and padded (owner -1 = padding)."""
    rows: list[tuple[list, list, list]] = []
    flat: tuple[list, list, list] = ([], [], [])
    for k, (ids, target) in enumerate(encoded):
        if not pack:
            flat = ([], [], [])
        for field, values in zip(flat, (ids, [k] * len(ids), target)):
            field.extend(values)
        while len(flat[0]) >= length or (not pack and flat[0]):
            rows.append(tuple(f[:length] for f in flat))
            flat = tuple(f[length:] for f in flat)
        if len(rows) >= n_rows:
            break
    if pack and flat[0] and len(rows) < n_rows:  # a finite stream's padded last row
        rows.append(flat)
    padded = []
    for toks, owner, target in rows[:n_rows]:
        pad = length - len(toks)
        padded.append((toks + [0] * pad, owner + [-1] * pad, target + [False] * pad))
    return padded


def _check_rows(batch_rows, ref_rows):
    """Tokens and loss mask of each (inputs + last target, loss_mask) row against the reference."""
    for (tokens, loss), (toks, owner, target) in zip(batch_rows, ref_rows, strict=True):
        assert tokens.tolist() == toks
        expected = [float(owner[t] == owner[t + 1] != -1 and target[t + 1]) for t in range(len(toks) - 1)]
        assert loss.tolist() == expected
        # Never a prompt token (nor BOS, nor padding) among the counted targets.
        assert all(target[t + 1] for t in np.flatnonzero(loss))


@pytest.mark.parametrize("pack", [True, False])
def test_packed_batches_count_only_response_tokens(chats, pack):
    cfg, reference = chats
    cfg.pack = pack
    tok, seed, n = CharTokenizer(), 3, 30
    docs = list(sources.load_documents(cfg, "train"))
    assert set(docs) <= set(reference)
    batches = [b for b, _ in zip(pipeline.make_train_iterator(cfg, tok, seed=seed), range(n))]
    T, B = cfg.seq_len, cfg.batch_size
    assert all(b["loss_mask"].shape == (B, T) and b["loss_mask"].dtype == np.float32 for b in batches)
    order = list(grain.MapDataset.range(len(docs)).shuffle(seed=seed).repeat(None)[: 2 * n * B])
    for r in range(B):
        ref = _reference_rows([reference[docs[i]] for i in order[r::B]], T + 1, pack, n)
        got = [(np.concatenate([b["inputs"][r], b["targets"][r, -1:]]), b["loss_mask"][r]) for b in batches]
        _check_rows(got, ref)
    in_doc = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert 0.2 < sum(float(b["loss_mask"].sum()) for b in batches) / in_doc < 0.9  # prompts: context


def test_real_tokenizer_row_is_the_encoded_conversation(chats, toks):
    cfg, _ = chats
    cfg.pack, cfg.seq_len = False, 256
    tok = toks["pieces"]
    docs = sources.load_documents(cfg, "train")
    b = next(pipeline.make_train_iterator(cfg, tok, seed=0))
    ids, mask = encode_conversation(tok, docs[int(grain.MapDataset.range(len(docs)).shuffle(seed=0)[0])])
    assert len(ids) <= cfg.seq_len
    row = np.concatenate([b["inputs"][0], b["targets"][0, -1:]])
    assert row[: len(ids)].tolist() == ids.tolist() and not row[len(ids):].any()
    assert b["loss_mask"][0].tolist() == mask[1:].tolist() + [0.0] * (cfg.seq_len + 1 - len(ids))


@pytest.mark.parametrize("pack,k", [(True, 0), (True, 4), (False, 3)])
def test_iterator_resume_gives_the_same_batches(chats, pack, k):
    cfg, _ = chats
    cfg.pack = pack
    tok = CharTokenizer()
    it = pipeline.make_train_iterator(cfg, tok, seed=7)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    expected = [next(it) for _ in range(6)]
    fresh = pipeline.make_train_iterator(cfg, tok, seed=7)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        assert got.keys() == want.keys() and all(np.array_equal(got[key], want[key]) for key in want)


def test_eval_batches_and_heldout_entropy_use_the_mask(chats):
    cfg, reference = chats
    tok = CharTokenizer()
    val = list(sources.load_documents(cfg, "validation"))
    batches = pipeline.make_eval_batches(cfg, tok, 1000)  # more than there is: every row, in order
    rows = [(np.concatenate([b["inputs"][r], b["targets"][r, -1:]]), b["loss_mask"][r])
            for b in batches for r in range(cfg.batch_size)]
    order = list(grain.MapDataset.range(len(val)).shuffle(seed=pipeline.EVAL_SEED))
    ref = _reference_rows([reference[val[i]] for i in order], cfg.seq_len + 1, True, len(rows))
    assert 0 < len(ref) <= len(rows)
    _check_rows(rows[: len(ref)], ref)
    assert not any(loss.any() or tokens.any() for tokens, loss in rows[len(ref):])
    # Held-out unigram entropy: over the response tokens and their EOS only.
    targets = [t for i in order for t, is_target in zip(*reference[val[i]]) if is_target]
    assert math.isclose(pipeline.heldout_unigram_entropy(cfg, tok), unigram_entropy(targets))


def test_tokenizer_trains_on_conversations(chats):
    cfg, _ = chats
    docs = sources.load_documents(cfg, "train")
    tok = train_tokenizer(docs, vocab_size=300, train_bytes=1_000_000, num_threads=1)
    for conv in list(docs)[:10]:
        ids, _ = encode_conversation(tok, conv)
        assert tok.decode(ids) == render_text(conv)
