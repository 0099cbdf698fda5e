"""Data sources: what each `data.source` kind reads, and the name its caches are keyed by.

`data.source` is `python_source` or `KIND:ARGUMENT`; the kinds are the DATA_SOURCES registry
(config/choices.py, where validation reads them), implemented here, one `DataSource` each.
Adding a source is one reader and one registration.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Sequence

from mixtral_jax.config import DataConfig
from mixtral_jax.config.schema import MixtureSource
from mixtral_jax.config.choices import DATA_SOURCES, parse_source
from mixtral_jax.data import corpus, instruct, token_cache
from mixtral_jax.data.corpus import Documents


@dataclass(frozen=True)
class DataSource:
    """load(argument, cfg, split) -> the split's documents; fingerprint(argument, cfg) -> a name
    for the corpus, stable across working directories (tokenizer cache keys)."""

    load: Callable[[str, DataConfig, str], Documents]
    fingerprint: Callable[[str, DataConfig], str]


def _path_fingerprint(kind: str) -> Callable[[str, DataConfig], str]:
    return lambda arg, cfg: f"{kind}:{os.path.abspath(os.path.expanduser(arg))}#{cfg.text_key}"


def _instruct_documents(arg: str, cfg: DataConfig, split: str) -> Documents:
    conversations = instruct.read_instruct_jsonl(arg)
    keys = [instruct.conversation_key(c) for c in conversations]
    return corpus.split_by_content(conversations, split, f"instruct:{arg}", keys)


DATA_SOURCES.register("python_source", DataSource(
    load=lambda arg, cfg, split: corpus.python_source(split),
    fingerprint=lambda arg, cfg: f"python_source/{corpus.PYTHON_SOURCE_CONFIG}"))
DATA_SOURCES.register("tfds", DataSource(
    load=lambda arg, cfg, split: corpus.tfds_source(arg, cfg.text_key, split),
    fingerprint=lambda arg, cfg: f"tfds:{arg}#{cfg.text_key}"))
DATA_SOURCES.register("jsonl", DataSource(
    load=lambda arg, cfg, split: corpus.split_by_content(corpus.read_jsonl(arg, cfg.text_key), split, f"jsonl:{arg}"),
    fingerprint=_path_fingerprint("jsonl")))
DATA_SOURCES.register("text", DataSource(
    load=lambda arg, cfg, split: corpus.split_by_content(corpus.read_text_dir(arg), split, f"text:{arg}"),
    fingerprint=_path_fingerprint("text")))
DATA_SOURCES.register("instruct", DataSource(load=_instruct_documents, fingerprint=_path_fingerprint("instruct")))
# Documents come out already encoded (token arrays); the pipeline's encoder passes them through.
DATA_SOURCES.register("tokens", DataSource(
    load=lambda arg, cfg, split: token_cache.TokenCache(arg, split),  # type: ignore[arg-type, return-value]
    fingerprint=lambda arg, cfg: f"tokens:{token_cache.read_manifest(arg)['source']['fingerprint']}"))


def token_cache_dirs(cfg: DataConfig) -> list[str]:
    """The `tokens:DIR` caches `cfg` reads (its source, or its mixture's sources)."""
    specs = [m.source for m in cfg.mixture] if cfg.mixture else [cfg.source]
    return [arg for kind, arg in map(parse_source, specs) if kind == "tokens"]


def _source(cfg: DataConfig) -> tuple[DataSource, str]:
    kind, arg = parse_source(cfg.source)
    return DATA_SOURCES.get(kind), arg


def source_config(cfg: DataConfig, entry: MixtureSource) -> DataConfig:
    """The data config of one mixture source on its own (its `source`, no mixture)."""
    return dataclasses.replace(cfg, source=entry.source, mixture=[])


class _Concatenated(Sequence):
    """Several document sequences as one, random access (a mixture's documents, e.g. for
    training its tokenizer)."""

    def __init__(self, parts: list[Documents], name: str):
        self._parts, self.name = parts, name
        self._starts = [0]
        for part in parts:
            self._starts.append(self._starts[-1] + len(part))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> instruct.Document:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index = int(index) % len(self)
        part = bisect.bisect_right(self._starts, index) - 1
        return self._parts[part][index - self._starts[part]]


def load_documents(cfg: DataConfig, split: str) -> Documents:
    """The documents of `split` ("train" or "validation") of `cfg.source`, random access (a
    mixture: all its sources' documents, one source after the other)."""
    if split not in corpus.SPLITS:
        raise ValueError(f"split must be one of {corpus.SPLITS}, got {split!r}")
    if cfg.mixture:
        parts = [load_documents(source_config(cfg, m), split) for m in cfg.mixture]
        return _Concatenated(parts, f"mixture:{split}")  # type: ignore[return-value]
    source, arg = _source(cfg)
    return source.load(arg, cfg, split)


def source_fingerprint(cfg: DataConfig) -> str:
    """A string naming the corpus, stable across working directories (for cache keys)."""
    if cfg.mixture:  # weights do not change the documents, so they are not part of the name
        return "mixture(" + ",".join(source_fingerprint(source_config(cfg, m)) for m in cfg.mixture) + ")"
    source, arg = _source(cfg)
    return source.fingerprint(arg, cfg)


def document_text(document: instruct.Document) -> str:
    """A document as text: itself, or a conversation's template text (for tokenizer training)."""
    return instruct.render_text(document)
