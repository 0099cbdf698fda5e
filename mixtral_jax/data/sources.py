"""Data sources: what each `data.source` kind reads, and the name its caches are keyed by.

`data.source` is `python_source` or `KIND:ARGUMENT`; the kinds are the DATA_SOURCES registry
(config/choices.py, where validation reads them), implemented here, one `DataSource` each.
Adding a source is one reader and one registration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from mixtral_jax.config import DataConfig
from mixtral_jax.config.choices import DATA_SOURCES, parse_source
from mixtral_jax.data import corpus, instruct
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


def _source(cfg: DataConfig) -> tuple[DataSource, str]:
    kind, arg = parse_source(cfg.source)
    return DATA_SOURCES.get(kind), arg


def load_documents(cfg: DataConfig, split: str) -> Documents:
    """The documents of `split` ("train" or "validation") of `cfg.source`, random access."""
    if split not in corpus.SPLITS:
        raise ValueError(f"split must be one of {corpus.SPLITS}, got {split!r}")
    source, arg = _source(cfg)
    return source.load(arg, cfg, split)


def source_fingerprint(cfg: DataConfig) -> str:
    """A string naming the corpus, stable across working directories (for cache keys)."""
    source, arg = _source(cfg)
    return source.fingerprint(arg, cfg)


def document_text(document: instruct.Document) -> str:
    """A document as text: itself, or a conversation's template text (for tokenizer training)."""
    return instruct.render_text(document)
