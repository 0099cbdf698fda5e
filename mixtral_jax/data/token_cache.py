"""Pre-tokenized caches (`data.source: tokens:DIR`, built by `mixtral-jax tokenize`): reading
and checking one. Building is tokenize.py.

Layout of DIR (one source; a mixture's cache holds one such folder per source):
  manifest.json           format, tokenizer and source fingerprints, per split: documents,
                          tokens and the shards with their record count and byte size
  tokenizer.model         the tokenizer the ids come from
  train/shard-00000.array_record, ..., validation/shard-00000.array_record
One ArrayRecord record per document: its token ids as little-endian int32 ([BOS] ... [EOS], as
the pipeline's encoder makes them), followed for instruct sources by one byte per token (1 =
a loss target). ArrayRecord's own index gives random access to record i, so a process (or a
row stream) reads only the documents it trains on, never whole shards.

Why a manifest with byte sizes: a truncated or missing shard would otherwise surface as an
opaque reader error (or silently fewer documents); here it is one line naming the file.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT = 1


def encode_record(encoded: np.ndarray | dict[str, np.ndarray]) -> bytes:
    """One document (the pipeline encoder's output) as a record."""
    if isinstance(encoded, dict):
        tokens = np.asarray(encoded["tokens"], "<i4")
        return tokens.tobytes() + np.asarray(encoded["target_mask"], np.uint8).tobytes()
    return np.asarray(encoded, "<i4").tobytes()


def decode_record(raw: bytes, masked: bool) -> np.ndarray | dict[str, np.ndarray]:
    if not masked:
        return np.frombuffer(raw, "<i4").astype(np.int32)
    n = len(raw) // 5  # 4 bytes of id + 1 byte of mask per token
    return {"tokens": np.frombuffer(raw, "<i4", count=n).astype(np.int32),
            "target_mask": np.frombuffer(raw, np.uint8, offset=4 * n).astype(bool)}


def tokenizer_sha256(model_proto: bytes) -> str:
    return hashlib.sha256(model_proto).hexdigest()


class CacheError(ValueError):
    """A token cache that cannot be used as it is (names the file)."""


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root).expanduser() / MANIFEST
    if not path.is_file():
        raise CacheError(f"data.source 'tokens:{root}': {path} not found (build the cache with "
                         "`mixtral-jax tokenize --config F --out DIR`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheError(f"{path}: not a readable token-cache manifest ({err})") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: token-cache format {manifest.get('format')!r}, this version reads {FORMAT}; "
                         "rebuild it with `mixtral-jax tokenize`")
    if "sources" in manifest:
        names = ", ".join(f"tokens:{Path(root) / name}" for name in manifest["sources"])
        raise CacheError(f"{path}: a mixture's cache; use its sources as data.mixture entries ({names})")
    return manifest


def check_tokenizer(root: str | Path, fingerprint: str, described: str) -> None:
    """CacheError naming the manifest if the cache's ids come from another vocabulary."""
    built = read_manifest(root)["tokenizer"]["fingerprint"]
    if built != fingerprint:
        raise CacheError(f"{Path(root).expanduser() / MANIFEST}: the cache was built with another tokenizer "
                         f"(vocabulary {built}) than this run's {described} (vocabulary {fingerprint}); rebuild it "
                         f"with `mixtral-jax tokenize`, or leave data.tokenizer.path unset to use "
                         f"{Path(root) / TOKENIZER_FILE}")


class TokenCache(Sequence):
    """One split of a cache, random access: `cache[i]` -> document i's encoded tokens (an int32
    array, or {"tokens", "target_mask"} for instruct data). The pipeline's encoder passes such
    documents through, so packing and segment ids are those of the on-the-fly pipeline."""

    def __init__(self, root: str | Path, split: str):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.root = Path(root).expanduser()
        manifest = read_manifest(self.root)
        if split not in manifest["splits"]:
            raise CacheError(f"{self.root / MANIFEST}: no '{split}' split")
        info = manifest["splits"][split]
        self.masked = bool(manifest["masked"])
        self.tokenizer_fingerprint = manifest["tokenizer"]["fingerprint"]
        self.name = f"tokens:{root}:{split}"
        self.tokens = int(info["tokens"])
        paths = []
        for shard in info["shards"]:
            path = self.root / shard["file"]
            if not path.is_file():
                raise CacheError(f"token cache shard {path} is missing (listed in {self.root / MANIFEST})")
            if path.stat().st_size != shard["bytes"]:
                raise CacheError(f"token cache shard {path} has {path.stat().st_size} bytes, the manifest says "
                                 f"{shard['bytes']}: truncated or replaced; rebuild the cache")
            paths.append(str(path))
        self._counts = [int(s["documents"]) for s in info["shards"]]
        self._starts = np.cumsum([0, *self._counts]).tolist()
        self._source = ArrayRecordDataSource(paths) if paths else []
        if len(self._source) != self._starts[-1]:
            raise CacheError(f"{self.root / MANIFEST}: shards hold {len(self._source)} documents, the manifest "
                             f"says {self._starts[-1]}")

    def __len__(self) -> int:
        return self._starts[-1]

    def shard_of(self, index: int) -> str:
        """The shard file holding document `index` (for error messages and tests)."""
        return str(self.root / f"shard {bisect.bisect_right(self._starts, index) - 1}")

    def __getitem__(self, index: int) -> np.ndarray | dict[str, np.ndarray]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return decode_record(self._source[int(index) % len(self)], self.masked)

    def __repr__(self) -> str:
        return f"TokenCache({self.name!r}, n={len(self)})"
