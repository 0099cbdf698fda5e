"""`export-hf` writes a tokenizer that `transformers.AutoTokenizer` loads and that encodes exactly as
ours. The reference is our own `Tokenizer` (sentencepiece itself): ids compared on every line and
every document of the embedded corpus's held-out split, on instruct-template text, and on edge
cases (leading spaces, tabs, newlines, unicode, byte-fallback characters, special-token text);
decoding compared as well. A Mistral-style model (dummy prefix, user-defined pieces) is checked
the same way. transformers 5 always loads the fast (tokenizers) implementation; a slow,
sentencepiece-backed tokenizer is checked too where the installed transformers provides one."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the export is checked against transformers itself")

from flax import nnx  # noqa: E402

from mixtral_jax.cli import main  # noqa: E402
from mixtral_jax.config import load_config  # noqa: E402
from mixtral_jax.data import corpus  # noqa: E402
from mixtral_jax.data.instruct import read_instruct_jsonl, render_text  # noqa: E402
from mixtral_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer  # noqa: E402
from mixtral_jax.interop import hf_tokenizer  # noqa: E402
from mixtral_jax.interop.convert import write_weights_run  # noqa: E402
from mixtral_jax.models.transformer import Transformer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16",
        "model.hidden_dim=64", "model.moe.num_experts=2", "model.moe.top_k=1", "model.max_seq_len=128"]

EDGE_CASES = [
    "", " ", "  ", "\n", "\t", " leading space", "   three leading spaces", "trailing space ",
    "\tdef f(x):\n\t\treturn x\n", "    indented = 1\n\n\n        deeper = [1, 2, 3]  # comment\n",
    "line\r\nwindows line\r\n", "no newline at end", "digits 1234567890 and 3.14e-10",
    "unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "byte fallback: 🙂🚀 \U0001F9EA ✓ ∑ ∫ \u200b zero width, \u00a0 nbsp, \ufeff bom",
    "control chars \x01\x02\x7f and a NUL \x00 byte",
    "special-token text: <s> </s> <unk> <pad> [INST] [/INST] <0x41>",
    '"""Docstring.\n\n    Args:\n        x: a value.\n    """\n', "▁ already a meta space ▁▁",
]


@pytest.fixture(scope="module")
def quickstart_tokenizer(corpus_cache) -> Tokenizer:
    cfg = load_config("configs/quickstart.yaml")
    return load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)


@pytest.fixture(scope="module")
def exported(quickstart_tokenizer, tmp_path_factory) -> Path:
    """A tiny quickstart-vocabulary run (fresh weights, written as import-hf writes a run) exported
    through the CLI."""
    root = tmp_path_factory.mktemp("hf_tokenizer")
    cfg = load_config("configs/quickstart.yaml", [f"run.out_dir={root}", "run.name=tiny", *TINY])
    _, params, rest = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)), nnx.Param, ...)
    write_weights_run(cfg.run_dir, cfg, params, rest, {"made_by": "test"}, Path(quickstart_tokenizer.path))
    out = root / "exported"
    assert main(["export-hf", "--run", str(cfg.run_dir), "--out", str(out)]) == 0
    return out


def _loaded(out: Path) -> list:
    """Every HF tokenizer the export loads as: AutoTokenizer's choice (the fast, tokenizers-backed
    one from tokenizer.json), and the slow one that reads tokenizer.model with sentencepiece
    (transformers 5: `SentencePieceBackend`; 4.x: `use_fast=False`) where it loads. The slow
    generic class has Llama's settings for neither `add_bos_token` nor decoding (it strips the
    text's end), so only its ids without special tokens are compared."""
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    found = [auto]
    try:
        if int(transformers.__version__.split(".")[0]) >= 5:
            from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

            slow = SentencePieceBackend.from_pretrained(str(out))
        else:
            slow = transformers.AutoTokenizer.from_pretrained(str(out), use_fast=False)
    except (ImportError, ValueError, OSError, TypeError):
        slow = None
    if slow is not None and type(slow) is not type(auto):
        slow.ids_only = True
        found.append(slow)
    return found


@pytest.fixture(scope="module")
def heldout_lines() -> list[str]:
    docs = corpus.python_source("validation")
    lines = [line for i in range(len(docs)) for line in docs[i].splitlines(keepends=True)]
    assert len(lines) > 3000
    return lines


def _check_same(ours: Tokenizer, theirs, texts: list[str], round_trip: bool = True) -> None:
    want = [ours.encode(t) for t in texts]
    got = theirs(texts, add_special_tokens=False)["input_ids"]
    bad = [(t, w, g) for t, w, g in zip(texts, want, got) if w != g]
    assert not bad, (f"{len(bad)} of {len(texts)} texts encode differently; first {bad[0][0]!r}: "
                     f"ours {[ours.id_to_piece(i) for i in bad[0][1]]}, HF {theirs.convert_ids_to_tokens(bad[0][2])}")
    if getattr(theirs, "ids_only", False):
        return
    # With special tokens: BOS first (what training puts before every document), no EOS.
    with_bos = theirs(texts, add_special_tokens=True)["input_ids"]
    assert all(g == [ours.bos_id, *w] for w, g in zip(want, with_bos))
    # Decoding agrees with ours, with and without [BOS] ... [EOS], and gives back the text (a
    # literal "▁" comes back as a space from both: sentencepiece's escape character).
    decoded = [ours.decode(w) for w in want]
    assert [theirs.decode(w) for w in want] == decoded
    assert [theirs.decode([ours.bos_id, *w, ours.eos_id], skip_special_tokens=True) for w in want] == decoded
    if round_trip:
        assert all(d == t for d, t in zip(decoded, texts) if "\u2581" not in t)


def test_export_writes_an_autotokenizer_loadable_tokenizer(exported, quickstart_tokenizer):
    assert (exported / "tokenizer.model").read_bytes() == quickstart_tokenizer.model_proto
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in exported.iterdir()}
    config = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 128
    for theirs in _loaded(exported):
        assert theirs.vocab_size == quickstart_tokenizer.vocab_size == len(theirs)
        ours = quickstart_tokenizer
        assert (theirs.unk_token_id, theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == (
            ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id)
        assert theirs.convert_ids_to_tokens(list(range(ours.vocab_size))) == [
            ours.id_to_piece(i) for i in range(ours.vocab_size)]


def test_same_ids_on_the_heldout_corpus(exported, quickstart_tokenizer, heldout_lines):
    docs = corpus.python_source("validation")
    for theirs in _loaded(exported):
        _check_same(quickstart_tokenizer, theirs, heldout_lines)  # every line, leading whitespace kept
        _check_same(quickstart_tokenizer, theirs, [docs[i] for i in range(len(docs))])  # whole files
        # Lines with their indentation and newline cut off differently: whitespace at either end.
        _check_same(quickstart_tokenizer, theirs, [line.rstrip("\n") for line in heldout_lines[:3000]]
                    + [" " + line.lstrip() for line in heldout_lines[:3000]])


def test_same_ids_on_edge_cases(exported, quickstart_tokenizer):
    ours = quickstart_tokenizer
    assert any(ours.id_to_piece(i).startswith("<0x") for t in EDGE_CASES for i in ours.encode(t)), \
        "the edge cases should exercise byte fallback"
    for theirs in _loaded(exported):
        _check_same(ours, theirs, EDGE_CASES)
        _check_same(ours, theirs, ["".join(EDGE_CASES)])


def test_same_ids_on_instruct_text(exported, quickstart_tokenizer):
    conversations = read_instruct_jsonl(str(ROOT / "configs/finetune/data/python_qa.jsonl"))
    conversations.append((("system", "Answer briefly."), ("user", "  What is\tthis? 🙂"), ("assistant", "A test."),
                          ("user", "And <s> this?"), ("assistant", "Also </s> one.")))
    texts = [render_text(c) for c in conversations]
    assert texts[0].startswith("[INST] ") and " [/INST] " in texts[0]
    for theirs in _loaded(exported):
        _check_same(quickstart_tokenizer, theirs, texts)


@pytest.mark.parametrize("normalization", ["identity", "nmt_nfkc"])
def test_mistral_style_model_with_dummy_prefix_and_user_pieces(tmp_path, heldout_lines, normalization):
    """Mistral's own tokenizer.model (which import-hf copies into a run) adds a dummy "▁" prefix,
    with identity normalisation and whitespace kept; Mistral v3 has user pieces such as [INST].
    A small model trained with those settings, and one with sentencepiece's defaults (NFKC
    character map, extra whitespace removed: ids must agree, text does not round-trip)."""
    import sentencepiece as spm

    identity = normalization == "identity"
    text = heldout_lines[:4000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, model_type="bpe", vocab_size=600,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["[INST]", "[/INST]"],
        character_coverage=0.995, num_threads=1, minloglevel=2, normalization_rule_name=normalization,
        remove_extra_whitespaces=not identity)
    path = tmp_path / "mistral_like.model"
    path.write_bytes(model.getvalue())
    ours = Tokenizer.from_file(path)
    assert ours.adds_dummy_prefix and ours.piece_id("[INST]") is not None
    out = tmp_path / "exported"
    hf_tokenizer.save_tokenizer(path, out, model_max_length=1 << 20)
    (out / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": ours.vocab_size}))
    texts = heldout_lines[4000:7000] + EDGE_CASES + ["[INST] What? [/INST] This.", "x[INST]y", " [INST]"]
    for theirs in _loaded(out):
        _check_same(ours, theirs, texts, round_trip=identity)


def test_non_bpe_or_unparsable_models_are_copied_only(tmp_path, caplog):
    (tmp_path / "x.model").write_bytes(b"not a sentencepiece model")
    assert hf_tokenizer.save_tokenizer(tmp_path / "x.model", tmp_path / "out") == [tmp_path / "out" / "tokenizer.model"]
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"not a sentencepiece model"
    assert "tokenizer.model only" in caplog.text
