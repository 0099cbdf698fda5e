"""Data mixtures (`data.mixture`): several sources, each a share of the training *tokens*.

Why not grain's `mix`: it draws *elements* (documents) by weight, so a source of long documents
gets more than its weight of the tokens. Here each row stream keeps, per source, the tokens it
has taken so far and takes its next document from the source furthest below its target
(`tokens_k / weight_k` smallest: a token-budget deficit scheduler). The shares of every stream,
hence of every batch window, stay within about one document of the weights, with no estimate
of document lengths and no randomness beyond each source's own (seeded) shuffle.

The scheduler's counts are part of the iterator state (so are each source's positions), so a
resumed run picks the same sources in the same order. New weights on resume are allowed: the
scheduler then restarts its counts, so the shares from there on follow the new weights.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Sequence

import grain
import numpy as np

from mixtral_jax.config.schema import MixtureSource
from mixtral_jax.data.instruct import split_encoded

log = logging.getLogger(__name__)


def mixture_weights(mixture: Sequence[MixtureSource]) -> list[float]:
    """The weights normalised to sum to 1 (a config's weights need not: 3 and 1 mean 75% / 25%)."""
    total = float(sum(m.weight for m in mixture))
    return [float(m.weight) / total for m in mixture]


def weights_note(mixture: Sequence[MixtureSource]) -> str | None:
    """A one-line note when the configured weights are normalised, else None."""
    total = float(sum(m.weight for m in mixture))
    if abs(total - 1.0) < 1e-9:
        return None
    shares = ", ".join(f"{m.name} {w:.4g}" for m, w in zip(mixture, mixture_weights(mixture)))
    return f"note: data.mixture weights sum to {total:g}, normalised to {shares}"


def pick_source(taken: Sequence[int], weights: Sequence[float]) -> int:
    """The source furthest below its share: argmin taken_k / weight_k (ties: the first)."""
    return int(np.argmin([t / w for t, w in zip(taken, weights)]))


class TokenMixIterDataset(grain.IterDataset):
    """Encoded documents from several parents, chosen by token deficit (module docstring).
    Items come out as {"tokens", "target_mask", "source": k}."""

    def __init__(self, parents: Sequence[grain.IterDataset], weights: Sequence[float]):
        super().__init__(list(parents))
        self._weights = [float(w) for w in weights]

    def __iter__(self) -> "_TokenMixIterator":
        return _TokenMixIterator([p.__iter__() for p in self._parents], self._weights)

    def __str__(self) -> str:
        return f"TokenMixIterDataset(weights={self._weights})"


class _TokenMixIterator(grain.DatasetIterator):
    def __init__(self, parents: list[grain.DatasetIterator], weights: list[float]):
        super().__init__(parents)
        self._weights = weights
        self._taken = [0] * len(parents)
        # Restored with other weights: the next pick still uses the saved ones, because the
        # packer re-reads the document it was cutting (it restores the state before it).
        self._pending: list[float] | None = None

    def __next__(self) -> dict[str, Any]:
        weights = self._pending or self._weights
        k = pick_source(self._taken, weights)
        tokens, mask = split_encoded(next(self._parents[k]))
        if self._pending is not None:  # the re-read is done: from here on the new weights rule
            self._pending, self._taken = None, [0] * len(self._taken)
        self._taken[k] += len(tokens)
        return {"tokens": tokens, "target_mask": np.ones(len(tokens), bool) if mask is None else mask,
                "source": k}

    def get_state(self) -> dict[str, Any]:
        return {"sources": [copy.deepcopy(p.get_state()) for p in self._parents], "taken": list(self._taken),
                "weights": list(self._pending or self._weights)}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self._parents):
            raise ValueError(f"mixture state has {len(state['sources'])} sources, this mixture {len(self._parents)}")
        for parent, sub in zip(self._parents, state["sources"]):
            parent.set_state(copy.deepcopy(sub))
        self._taken = [int(t) for t in state["taken"]]
        saved = [float(w) for w in state["weights"]]
        self._pending = saved if not np.allclose(saved, self._weights, rtol=0, atol=1e-12) else None
