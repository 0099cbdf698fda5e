"""Checks a run makes before it compiles or trains, so a mistake costs seconds, not a crash
(or silently wrong numbers) later."""

from __future__ import annotations

import numpy as np

from mixtral_jax.config import ConfigError


def check_vocab(tokenizer_pieces: int, model_vocab: int, tokenizer_path: str | None) -> None:
    """A token id >= model.vocab_size would index past the embedding table: on accelerators the
    gather clamps or returns garbage instead of failing, so refuse the pairing up front."""
    if tokenizer_pieces > model_vocab:
        raise ConfigError(f"the tokenizer ({tokenizer_path}) has {tokenizer_pieces} pieces but model.vocab_size is "
                          f"{model_vocab}: token ids up to {tokenizer_pieces - 1} would not fit the embedding; set "
                          f"model.vocab_size >= {tokenizer_pieces} or use a matching tokenizer")


def check_token_ids(batch: dict, model_vocab: int) -> None:
    """The same guarantee for the data actually fed (e.g. ids added by a data source)."""
    for key in ("inputs", "targets"):
        if key in batch:
            ids = np.asarray(batch[key])
            if ids.size and int(ids.max()) >= model_vocab:
                raise ConfigError(f"the training data has token id {int(ids.max())} ('{key}') but model.vocab_size "
                                  f"is {model_vocab}: ids must be < {model_vocab}")
