"""grain input pipeline: documents -> tokens -> packed rows -> batches, checkpointable.

Layout. Row r of every global batch comes from its own *row stream* r: the (shuffled,
repeated) document sequence d_0, d_1, ... is dealt round-robin, stream r getting
d_r, d_{r+B}, d_{r+2B}, ... (B = global batch size), and each stream concatenates its
documents ([BOS] text [EOS]) and splits them into rows of seq_len + 1 tokens. So:
  * a process only tokenizes the rows it owns: shard i of n holds streams
    [i*B/n, (i+1)*B/n), and the shards' rows together are exactly the global batch,
    which does not depend on the number of processes;
  * every batch mixes B different documents even when one document spans many rows;
  * grain's mp_prefetch deals the streams out to worker processes and re-interleaves
    them round-robin, so the batches are the same for any `num_workers` dividing B/n.
Held-out batches instead pack the validation split as one stream and keep evenly spaced
rows, so a few eval batches still cover many files at every depth.

Batches are numpy dicts, B = this process's rows, T = seq_len:
  inputs, targets   int32[B, T]    targets[:, t] = the token after inputs[:, t]
  segment_ids       int32[B, T]    1, 2, ... per document piece within a row; 0 = padding
  positions         int32[B, T]    0 at each piece's first token (RoPE positions)
  loss_mask         float32[B, T]  1 where the target is in the input's document (EOS
                                   included), 0 across a document boundary and on padding;
                                   for instruct conversations also 0 unless the target is a
                                   response token or its EOS (see instruct.py)
Attention should be causal within equal, non-zero segment_ids.

Iterator state (`it.get_state()`) is a small JSON-serialisable dict: per stream, the grain
state of its document iterator before the current document plus the offset into it, wrapped
with a description of the pipeline so that a state from a different one is refused.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Sequence

import grain
import numpy as np

from mixtral_jax.config import DataConfig
from mixtral_jax.config.schema import MixtureSource
from mixtral_jax.data import token_cache
from mixtral_jax.data.mixture import TokenMixIterDataset, mixture_weights, weights_note
from mixtral_jax.data.packing import SOURCE_KEY, PackIterDataset, RoundRobinIterDataset, to_batch
from mixtral_jax.data.sources import load_documents, source_config
from mixtral_jax.data.instruct import Document, encode_document, target_ids
from mixtral_jax.data.tokenizer import Tokenizer, unigram_entropy

log = logging.getLogger(__name__)

EVAL_SEED = 0  # held-out batches never depend on the run seed


class _Encode:
    """Text -> int32 [BOS, ..., EOS]; conversation -> {"tokens", "target_mask"}. A class
    (not a lambda) so it pickles to workers."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, document: Document) -> np.ndarray | dict[str, np.ndarray]:
        return encode_document(self.tokenizer, document)


def _absl_flags_parsed() -> None:
    """grain's mp_prefetch reads absl flags, which raises in programs that never parse them
    (google/grain#1355); declaring them parsed keeps every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _local_rows(batch_size: int, shard_index: int, shard_count: int) -> range:
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    if batch_size % shard_count:
        raise ValueError(f"data.batch_size ({batch_size}) must be divisible by the number of "
                         f"data shards / processes ({shard_count})")
    per = batch_size // shard_count
    return range(shard_index * per, (shard_index + 1) * per)


def _workers(requested: int, rows: int) -> int:
    """Worker w gets streams w::W; re-interleaving restores the row order only if W | rows."""
    if requested <= 0:
        return 0
    return max(w for w in range(1, min(requested, rows) + 1) if rows % w == 0)


def _document_streams(docs: Sequence[Document], tokenizer: Tokenizer, cfg: DataConfig, *, seed: int,
                      train: bool, rows: range, streams: int) -> list[grain.IterDataset]:
    """Per row r in `rows`: its encoded documents d_r, d_{r+streams}, ... of the (train:
    shuffled every epoch, endless; eval: one fixed pass) document order."""
    if len(docs) == 0:
        raise ValueError(f"{getattr(docs, 'name', 'data')}: no documents")
    cached = getattr(docs, "tokenizer_fingerprint", None)  # a token cache: its ids are one vocabulary's
    if cached is not None and cached != tokenizer.fingerprint:
        token_cache.check_tokenizer(docs.root, tokenizer.fingerprint, f"tokenizer {tokenizer.path}")
    source = grain.MapDataset.source(docs)
    if train:
        if cfg.shuffle_buffer_docs > 0:  # bounded-window shuffle for very large sources
            source = grain.experimental.WindowShuffleMapDataset(
                source, window_size=cfg.shuffle_buffer_docs, seed=seed)
        else:
            source = source.shuffle(seed=seed)  # reshuffled every epoch once repeated
        source = source.repeat(None)
    else:
        source = source.shuffle(seed=seed)  # a fixed mix of held-out files
    encode = _Encode(tokenizer)
    # No read-ahead threads: each stream tokenizes a document only when it needs one (the
    # default 16 threads x 500 documents per stream would tokenize the corpus up front).
    inline = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return [source[r::streams].map(encode).to_iter_dataset(inline) for r in rows]


def _build(docs: Sequence[Document] | Sequence[Sequence[Document]], tokenizer: Tokenizer, cfg: DataConfig, *,
           seed: int, train: bool, rows: range, streams: int, num_workers: int = 0,
           weights: Sequence[float] | None = None) -> grain.IterDataset:
    """Rows `rows` of the `streams` row streams, batched one round (len(rows)) at a time.
    With `weights`, `docs` is one document sequence per mixture source, mixed per stream by
    token deficit (mixture.py); each source is shuffled with its own seed."""
    if weights is None:
        per_row = _document_streams(docs, tokenizer, cfg, seed=seed, train=train, rows=rows, streams=streams)
    else:
        per_source = [_document_streams(d, tokenizer, cfg, seed=(seed + 7919 * k) % 2**32, train=train,
                                        rows=rows, streams=streams) for k, d in enumerate(docs)]
        per_row = [TokenMixIterDataset(parents, weights) for parents in zip(*per_source)]
    length = cfg.seq_len + 1
    ds: grain.IterDataset = RoundRobinIterDataset(
        [PackIterDataset(stream, length, concat=cfg.pack) for stream in per_row], length)
    workers = _workers(num_workers, len(rows))
    if workers:
        if workers != num_workers:
            log.info("data.num_workers=%d -> %d (must divide the %d local rows)",
                     num_workers, workers, len(rows))
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return ds.batch(len(rows), drop_remainder=False).map(to_batch)


class DataIterator(grain.DatasetIterator):
    """The pipeline's grain iterator plus a description of the pipeline it belongs to. Being
    a grain DatasetIterator, `grain.checkpoint.CheckpointSave/Restore` can store its state
    (one JSON file per process); `set_state` refuses a state saved by another pipeline
    (seed, source, batch layout, workers, tokenizer) instead of silently resuming elsewhere.
    With a mixture, it also counts each source's tokens in the batches it hands out
    (`source_tokens`, this process's rows; kept in the state) and strips the per-token source
    ids from the batch; a state saved with other weights is taken, with a line in `notes`."""

    def __init__(self, parent: grain.DatasetIterator, spec: dict[str, Any],
                 mixture: Sequence[MixtureSource] = (), weights: Sequence[float] = ()):
        super().__init__(parent)
        self.spec = spec
        self.names = [m.name for m in mixture]
        self.weights = list(weights)
        self.source_tokens = {name: 0 for name in self.names}
        self.notes: list[str] = []

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        if SOURCE_KEY in batch:
            ids = batch.pop(SOURCE_KEY)
            counts = np.bincount(ids[batch["segment_ids"] > 0], minlength=len(self.names))
            for name, count in zip(self.names, counts):
                self.source_tokens[name] += int(count)
        return batch

    def get_state(self) -> dict[str, Any]:
        state = {"pipeline": dict(self.spec), "grain": self._parent.get_state()}
        if self.names:
            state["mixture"] = {"weights": dict(zip(self.names, self.weights)), "tokens": dict(self.source_tokens)}
        return state

    def set_state(self, state: dict[str, Any]) -> None:
        saved = state.get("pipeline", {}) if isinstance(state, dict) else {}
        changed = sorted(k for k in self.spec.keys() | saved.keys() if saved.get(k) != self.spec.get(k))
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {self.spec.get(k)!r}" for k in changed)
            raise ValueError(f"data iterator state belongs to a different pipeline ({diff})")
        self._parent.set_state(state["grain"])
        if self.names:
            mix = state["mixture"]
            self.source_tokens = {name: int(mix["tokens"][name]) for name in self.names}
            before = [float(mix["weights"][name]) for name in self.names]
            if not np.allclose(before, self.weights, rtol=0, atol=1e-12):
                shares = ", ".join(f"{n} {a:.4g} -> {b:.4g}" for n, a, b in zip(self.names, before, self.weights))
                self.notes.append(f"note: data.mixture weights changed on resume ({shares}); the token shares "
                                  "follow the new weights from here on")


def _spec(cfg: DataConfig, tokenizer: Tokenizer, seed: int, rows: range, workers: int) -> dict:
    tok_id = getattr(tokenizer, "fingerprint", type(tokenizer).__name__)
    # A mixture is named by its sources, not their weights: new weights may resume a run.
    source = [f"{m.name}={m.source}" for m in cfg.mixture] if cfg.mixture else cfg.source
    return {"source": source, "text_key": cfg.text_key, "seq_len": cfg.seq_len,
            "pack": cfg.pack, "batch_size": cfg.batch_size, "rows": f"{rows.start}:{rows.stop}",
            "num_workers": workers, "seed": seed, "shuffle_buffer_docs": cfg.shuffle_buffer_docs,
            "tokenizer": tok_id}


def make_train_iterator(cfg: DataConfig, tokenizer: Tokenizer, *, seed: int,
                        shard_index: int = 0, shard_count: int = 1) -> DataIterator:
    """Endless iterator of this process's `batch_size // shard_count` rows of each global
    training batch (dict layout in the module docstring). `get_state()` / `set_state()`
    resume it exactly; call `close()` when done if `num_workers` > 0."""
    rows = _local_rows(cfg.batch_size, shard_index, shard_count)
    workers = _workers(cfg.num_workers, len(rows))
    spec = _spec(cfg, tokenizer, seed, rows, workers)
    if cfg.mixture:
        weights = mixture_weights(cfg.mixture)
        docs = [load_documents(source_config(cfg, m), "train") for m in cfg.mixture]
        ds = _build(docs, tokenizer, cfg, seed=seed, train=True, rows=rows, streams=cfg.batch_size,
                    num_workers=cfg.num_workers, weights=weights)
        data = DataIterator(iter(ds), spec, cfg.mixture, weights)
        data.notes += [note] if (note := weights_note(cfg.mixture)) else []
        return data
    docs = load_documents(cfg, "train")
    ds = _build(docs, tokenizer, cfg, seed=seed, train=True, rows=rows, streams=cfg.batch_size,
                num_workers=cfg.num_workers)
    return DataIterator(iter(ds), spec)


EVAL_SPREAD = 20  # eval rows are every k-th row (k <= this) of the packed validation stream
EVAL_SCAN_TOKENS = 4_000_000  # ... scanning at most about this many validation tokens


def make_eval_sets(cfg: DataConfig, tokenizer: Tokenizer, num_batches: int, *,
                   shard_index: int = 0, shard_count: int = 1) -> dict[str, list[dict[str, np.ndarray]]]:
    """Held-out batches per mixture source name ({"": batches} without a mixture), each
    source's from its own validation split (`num_batches` each)."""
    if not cfg.mixture:
        return {"": make_eval_batches(cfg, tokenizer, num_batches, shard_index=shard_index, shard_count=shard_count)}
    return {m.name: make_eval_batches(source_config(cfg, m), tokenizer, num_batches, shard_index=shard_index,
                                      shard_count=shard_count) for m in cfg.mixture}


def make_eval_batches(cfg: DataConfig, tokenizer: Tokenizer, num_batches: int, *,
                      shard_index: int = 0, shard_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Held-out batches, the same on every call and independent of the run seed (a mixture:
    every source's, one after the other; per source: make_eval_sets).

    The validation documents (fixed order) are packed into one stream and every k-th row is
    kept, so the few eval rows sample many files at all depths rather than the first rows of
    a few files; fewer batches if the split is small; padding rows have loss_mask 0.
    """
    if cfg.mixture:
        sets = make_eval_sets(cfg, tokenizer, num_batches, shard_index=shard_index, shard_count=shard_count)
        return [batch for batches in sets.values() for batch in batches]
    rows = _local_rows(cfg.batch_size, shard_index, shard_count)
    need = num_batches * cfg.batch_size
    if need == 0:
        return []
    docs = load_documents(cfg, "validation")
    spread = max(1, min(EVAL_SPREAD, EVAL_SCAN_TOKENS // (need * (cfg.seq_len + 1))))
    ds = _build(docs, tokenizer, cfg, seed=EVAL_SEED, train=False, rows=range(1), streams=1)
    stream = [b for b in itertools.islice(ds, need * spread) if b["segment_ids"].any()]
    stride = max(1, len(stream) // need)
    picked = stream[::stride][:need]
    if len(picked) < need:  # a small split: pad to whole batches (loss_mask 0 there)
        log.warning("validation split gives only %d of %d eval rows", len(picked), need)
        blank = {k: np.zeros_like(v) for k, v in picked[0].items()}
        picked += [blank] * (-len(picked) % cfg.batch_size)
    batches = []
    for start in range(0, len(picked), cfg.batch_size):
        group = picked[start:start + cfg.batch_size][rows.start:rows.stop]
        batches.append({k: np.concatenate([g[k] for g in group]) for k in group[0]})
    return batches


def heldout_unigram_entropy(cfg: DataConfig, tokenizer: Tokenizer, max_tokens: int = 1_000_000) -> float:
    """Unigram entropy (nats/token) of up to `max_tokens` of the validation split (documents
    in the eval order; only target tokens: no BOS, no instruct prompts): the loss of the
    best context-free predictor on held-out text. Measure it on the split, not on a few eval
    batches: with far fewer tokens than vocabulary entries the estimate is biased low."""
    docs = load_documents(cfg, "validation")
    order = grain.MapDataset.range(len(docs)).shuffle(seed=EVAL_SEED)
    chunks, total = [], 0
    for index in order:
        ids = target_ids(tokenizer, docs[int(index)])
        chunks.append(np.asarray(ids[: max_tokens - total], np.int64))
        total += len(chunks[-1])
        if total >= max_tokens:
            break
    return unigram_entropy(np.concatenate(chunks))
