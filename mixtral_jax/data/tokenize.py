"""Building a token cache (`mixtral-jax tokenize --config F --out DIR`): every document of both
splits of `data.source` (or of each `data.mixture` source) tokenized once into ArrayRecord
shards, in the source's own document order (the pipeline shuffles when it reads). The format
and the reader are token_cache.py.

The cache is complete only once its manifest is written (last, atomically), so an interrupted
build is never mistaken for a cache; building again replaces it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from mixtral_jax.config import DataConfig
from mixtral_jax.data import token_cache
from mixtral_jax.data.corpus import SPLITS
from mixtral_jax.data.instruct import encode_document
from mixtral_jax.data.sources import load_documents, source_config, source_fingerprint
from mixtral_jax.data.tokenizer import Tokenizer

SHARD_TOKENS = 1 << 24  # a new shard after ~16M tokens (64 MB of int32): many files, none huge


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _clear(out: Path) -> None:
    """Make `out` an empty cache folder: an earlier cache there is replaced; any other non-empty
    folder is refused (never delete what this command did not write)."""
    if out.is_dir() and any(out.iterdir()):
        if not (out / token_cache.MANIFEST).is_file():
            raise ValueError(f"--out {out}: exists and is not a token cache; give a new or empty folder")
        (out / token_cache.MANIFEST).unlink()  # first: a half-replaced cache is never taken for complete
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_split(docs: Any, tokenizer: Tokenizer, folder: Path, shard_tokens: int) -> tuple[dict, bool]:
    """The split's documents into folder/shard-NNNNN.array_record; its manifest entry and
    whether the records carry target masks (instruct data)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    writer, count, tokens, masked = None, 0, 0, False

    def close() -> None:
        writer.close()
        path = folder / f"shard-{len(shards):05d}.array_record"
        shards.append({"file": f"{folder.name}/{path.name}", "documents": count, "tokens": tokens,
                       "bytes": path.stat().st_size})

    for index in range(len(docs)):
        if writer is None:
            # group_size:1 -> one record per chunk: reading document i decodes only document i.
            writer = ArrayRecordWriter(str(folder / f"shard-{len(shards):05d}.array_record"), "group_size:1")
            count = tokens = 0
        encoded = encode_document(tokenizer, docs[index])
        masked = masked or isinstance(encoded, dict)
        writer.write(token_cache.encode_record(encoded))
        count += 1
        tokens += len(encoded["tokens"] if isinstance(encoded, dict) else encoded)
        if tokens >= shard_tokens:
            close()
            writer = None
    if writer is not None:
        close()
    return {"documents": sum(s["documents"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
            "shards": shards}, masked


def build_source(cfg: DataConfig, tokenizer: Tokenizer, out: Path, shard_tokens: int = SHARD_TOKENS,
                 say: Callable[[str], None] = print) -> dict[str, Any]:
    """One source's cache in `out` (replacing what is there); returns its manifest."""
    out = Path(out)
    _clear(out)
    start = time.perf_counter()
    splits, masked = {}, False
    for split in SPLITS:
        splits[split], split_masked = _write_split(load_documents(cfg, split), tokenizer, out / split, shard_tokens)
        masked = masked or split_masked
    tokenizer.save(out / token_cache.TOKENIZER_FILE)
    manifest = {
        "format": token_cache.FORMAT,
        "tokenizer": {"fingerprint": tokenizer.fingerprint, "sha256": token_cache.tokenizer_sha256(tokenizer.model_proto),
                      "vocab_size": tokenizer.vocab_size},
        "source": {"spec": cfg.source, "fingerprint": source_fingerprint(cfg), "text_key": cfg.text_key},
        "masked": masked,
        "splits": splits,
    }
    _write_json(out / token_cache.MANIFEST, manifest)  # last: its presence means complete
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{s} {v['documents']} documents / {v['tokens']:,} tokens in {len(v['shards'])} shard(s)"
                       for s, v in splits.items())
    say(f"{cfg.source} -> {out}: {counts} ({seconds:.1f} s)")
    return manifest


def build_cache(cfg: DataConfig, tokenizer: Tokenizer, out: str | Path, shard_tokens: int = SHARD_TOKENS,
                say: Callable[[str], None] = print) -> dict[str, Any]:
    """The cache of `cfg`'s source in `out`, or for a mixture one cache per source in
    out/<name> plus a manifest naming them. Returns the (top-level) manifest."""
    out = Path(out).expanduser()
    if not cfg.mixture:
        return build_source(cfg, tokenizer, out, shard_tokens, say)
    out.mkdir(parents=True, exist_ok=True)
    sources = {m.name: build_source(source_config(cfg, m), tokenizer, out / m.name, shard_tokens, say)
               for m in cfg.mixture}
    manifest = {"format": token_cache.FORMAT, "sources": {name: m["source"] for name, m in sources.items()},
                "tokenizer": next(iter(sources.values()))["tokenizer"]}
    _write_json(out / token_cache.MANIFEST, manifest)
    entries = ", ".join(f"{{name: {m.name}, source: 'tokens:{out / m.name}', weight: {m.weight:g}}}"
                        for m in cfg.mixture)
    say(f"train from it with: data.mixture=[{entries}]")
    return manifest
