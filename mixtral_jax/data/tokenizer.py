"""SentencePiece BPE tokenizer (Mistral conventions) and training it on the corpus, cached.

Mistral's tokenizer: BPE, byte fallback, unk=0, bos=1, eos=2, no pad piece (so padding
positions use id 0 and are masked out by `loss_mask`). The trainer settings here keep text
exactly recoverable (`decode(encode(s)) == s`): identity normalisation, no dummy prefix,
whitespace runs kept (code indentation becomes pieces like "▁▁▁▁"), newlines left in the
training sentences so merges such as a docstring quote + newline are learned.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from mixtral_jax.config import DataConfig
from mixtral_jax.data import sources, token_cache
from mixtral_jax.data.cache import cache_dir, file_lock

log = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# Bump when the trainer settings below change, so stale cached models are not reused.
TRAINER_VERSION = 1
SENTENCE_CHARS = 4096  # training "sentences" are runs of whole lines up to this size


class Tokenizer:
    """A loaded SentencePiece model. Picklable (carries its serialized proto), so grain
    worker processes can tokenize."""

    def __init__(self, model_proto: bytes, path: str | None = None):
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path = path

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        try:
            return cls(path.read_bytes(), str(path))
        except RuntimeError as err:  # sentencepiece's parse failure
            raise ValueError(f"{path} is not a sentencepiece model ({err})") from None

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def fingerprint(self) -> str:
        """Hash of the vocabulary, stable across machines (the serialized model also records
        the trainer's thread count, so identical tokenizers can differ byte-wise)."""
        pieces = "\n".join(self._sp.id_to_piece(i) for i in range(self.vocab_size))
        return hashlib.sha256(pieces.encode("utf-8", "surrogatepass")).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        # Mistral models have no pad piece (-1); padded positions carry unk and are masked.
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.unk_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_with_spans(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's [start, end) character span in `text` (byte-fallback
        pieces split their character's span)."""
        try:  # sentencepiece >= 0.2.1: character offsets directly
            mapping = self._sp.encode(text, return_type="offset_mapping")
            return list(mapping["ids"]), [tuple(span) for span in mapping["offsets"]]
        except (TypeError, ValueError):
            pass
        proto = self._sp.encode(text, out_type="immutable_proto")  # older releases: byte offsets
        encoded = text.encode("utf-8", "surrogatepass")
        char_at = np.zeros(len(encoded) + 1, np.int64)
        position = 0
        for index, ch in enumerate(text):
            width = len(ch.encode("utf-8", "surrogatepass"))
            char_at[position:position + width] = index
            position += width
        char_at[len(encoded)] = len(text)
        spans = [(int(char_at[min(p.begin, len(encoded))]), int(char_at[min(p.end, len(encoded))]))
                 for p in proto.pieces]
        return [p.id for p in proto.pieces], spans

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    @functools.cached_property
    def adds_dummy_prefix(self) -> bool:
        """Whether encode() prepends "▁" to its text (Mistral's own models do; ours do not).
        Read off an encoding: the normalizer spec is not exposed by the processor."""
        pieces = self._sp.encode("a", out_type=str)
        return bool(pieces) and pieces[0].startswith("\u2581")

    def piece_id(self, piece: str) -> int | None:
        """The id of `piece` if the vocabulary has it as one piece (e.g. a control or
        user-defined "[INST]"), else None (sentencepiece itself answers unk for unknowns)."""
        token_id = self._sp.piece_to_id(piece)
        if self._sp.is_unknown(token_id) and piece != self._sp.id_to_piece(token_id):
            return None
        return int(token_id)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model file (e.g. into a run directory) and remember it as `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, self._proto)
        self.path = str(path)
        return path

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path!r})"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)  # readers never see a half-written model


def _training_sentences(documents: Sequence[str], max_bytes: int) -> Iterator[str]:
    """Whole-line chunks of documents in a fixed pseudo-random document order, up to
    `max_bytes` in all. A fixed order (not the corpus order, which is sorted by path)
    gives a representative sample and a reproducible model."""
    order = np.random.default_rng(0).permutation(len(documents))
    total = 0
    for index in order:
        chunk: list[str] = []
        size = 0
        # Instruct sources hold conversations: train on their template text.
        for line in sources.document_text(documents[int(index)]).splitlines(keepends=True):
            if size + len(line) > SENTENCE_CHARS and chunk:
                piece = "".join(chunk)
                total += len(piece.encode("utf-8", "surrogatepass"))
                yield piece
                if total >= max_bytes:
                    return
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            piece = "".join(chunk)
            total += len(piece.encode("utf-8", "surrogatepass"))
            yield piece
            if total >= max_bytes:
                return


def train_tokenizer(documents: Sequence[str], vocab_size: int, train_bytes: int,
                    byte_fallback: bool = True, num_threads: int | None = None) -> Tokenizer:
    """Train a BPE SentencePiece model on up to `train_bytes` of `documents` (in memory)."""
    sentences = list(_training_sentences(documents, train_bytes))
    if not sentences:
        raise ValueError("cannot train a tokenizer: the train split has no text")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=byte_fallback,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            # Exact round trip of source code: no NFKC, no dummy prefix, keep all whitespace.
            normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9995 if byte_fallback else 1.0,
            # Feed every sentence (already capped by train_bytes) in order: deterministic.
            input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=4 * SENTENCE_CHARS + 16,  # bytes; a chunk is <= 4 B/char
            num_threads=num_threads or min(16, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as err:
        raise ValueError(f"sentencepiece could not train a {vocab_size}-piece vocabulary on "
                         f"{sum(map(len, sentences))} characters ({err}); use a smaller "
                         "model.vocab_size or more data") from None
    return Tokenizer(model.getvalue())


def tokenizer_cache_path(cfg: DataConfig, vocab_size: int) -> Path:
    """Where the tokenizer trained for (source, vocab_size, train_bytes, byte_fallback) lives."""
    key = json.dumps({"source": sources.source_fingerprint(cfg), "vocab_size": vocab_size,
                      "train_bytes": cfg.tokenizer.train_bytes,
                      "byte_fallback": cfg.tokenizer.byte_fallback,
                      "trainer": TRAINER_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / f"bpe{vocab_size}-{digest}.model"


def load_or_train_tokenizer(cfg: DataConfig, vocab_size: int) -> Tokenizer:
    """Load `cfg.tokenizer.path`, or train (once, cached) a BPE model on the train split. With
    token caches (`tokens:DIR`), the tokenizer they were built with (or data.tokenizer.path, which
    must then have the same vocabulary)."""
    caches = sources.token_cache_dirs(cfg)
    if caches:
        path = cfg.tokenizer.path or str(Path(caches[0]).expanduser() / token_cache.TOKENIZER_FILE)
        tok = Tokenizer.from_file(path)
        for root in caches:
            token_cache.check_tokenizer(root, tok.fingerprint, f"tokenizer {path}")
        if tok.vocab_size != vocab_size:
            raise ValueError(f"tokenizer {path} has {tok.vocab_size} pieces but model.vocab_size is {vocab_size}; "
                             "they must match")
        return tok
    if cfg.tokenizer.path:
        tok = Tokenizer.from_file(cfg.tokenizer.path)
        if tok.vocab_size != vocab_size:
            raise ValueError(f"tokenizer {cfg.tokenizer.path} has {tok.vocab_size} pieces but "
                             f"model.vocab_size is {vocab_size}; they must match")
        return tok
    path = tokenizer_cache_path(cfg, vocab_size)
    if not path.is_file():
        with file_lock(path.with_suffix(".lock")):
            if not path.is_file():
                docs = sources.load_documents(cfg, "train")
                start = time.perf_counter()
                tok = train_tokenizer(docs, vocab_size, cfg.tokenizer.train_bytes,
                                      cfg.tokenizer.byte_fallback)
                tok.save(path)
                log.info("trained a %d-piece BPE tokenizer in %.1f s -> %s",
                         vocab_size, time.perf_counter() - start, path)
    tok = Tokenizer.from_file(path)
    if tok.vocab_size != vocab_size:  # hard_vocab_limit makes this unreachable; be explicit
        raise ValueError(f"trained tokenizer has {tok.vocab_size} pieces, expected {vocab_size}")
    return tok


def unigram_entropy(token_stream: Iterable[int] | Iterable[Sequence[int]] | np.ndarray) -> float:
    """Entropy in nats/token of the empirical unigram distribution of the tokens.

    Accepts a flat iterable of ids, an iterable of id sequences / arrays, or an array. It is
    the loss of the best context-free predictor fitted to the same tokens, so a held-out LM
    loss below it shows the model uses context. The plug-in estimate is biased low unless
    there are many more tokens than vocabulary entries in use (a few eval batches are too
    few: use e.g. `pipeline.heldout_unigram_entropy`)."""
    items = [token_stream] if isinstance(token_stream, np.ndarray) else list(token_stream)
    if items and all(np.ndim(item) == 0 for item in items):
        parts = [np.asarray(items)]  # a flat stream of ids
    else:
        parts = [np.asarray(item).ravel() for item in items]
    flat = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    if flat.size == 0:
        raise ValueError("unigram_entropy of an empty token stream")
    n = np.unique(flat, return_counts=True)[1].astype(np.float64)
    p = n / n.sum()
    return float(-(p * np.log(p)).sum())
