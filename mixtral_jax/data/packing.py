"""Packing documents into rows and dealing row streams into batches (grain datasets the
pipeline composes; pipeline.py describes the layout). Both keep their position as a small
JSON-serialisable state, so a resumed pipeline continues mid-document."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import grain
import numpy as np

from mixtral_jax.data.instruct import split_encoded

SOURCE_KEY = "source_ids"  # mixture batches: each input token's source (DataIterator strips it)


# ---------------------------------------------------------------- packing


class PackIterDataset(grain.IterDataset):
    """Token arrays -> rows of exactly `length` tokens with per-row segment ids (1, 2, ...)
    and positions restarting at 0 for every segment (also for the continuation of a document
    split across rows, which keeps positions < length). With `concat=False` a row never holds
    two documents (its tail is padded). A finite parent's last row is padded. A parent item
    may also be {"tokens", "target_mask"}; rows carry "target_mask" (bool, True = the token
    may be a target; all True for plain token arrays, False on padding)."""

    def __init__(self, parent: grain.IterDataset, length: int, concat: bool = True):
        super().__init__(parent)
        self._length = length
        self._concat = concat

    def __iter__(self) -> "_PackIterator":
        return _PackIterator(self._parent.__iter__(), self._length, self._concat)

    def __str__(self) -> str:
        return f"PackIterDataset(length={self._length}, concat={self._concat})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, length: int, concat: bool):
        super().__init__(parent)
        self._length = length
        self._concat = concat
        self._head: np.ndarray | None = None  # the document being cut into rows
        self._head_mask: np.ndarray | None = None  # its target mask; None = all targets
        self._head_source: int | None = None  # its mixture source (None: not a mixture)
        self._head_state = copy.deepcopy(parent.get_state())  # parent state before _head
        self._offset = 0  # tokens of _head already emitted

    def _next_document(self) -> bool:
        self._head_state = copy.deepcopy(self._parent.get_state())
        try:
            self._read_head()
        except StopIteration:
            self._head = None
            return False
        self._offset = 0
        return True

    def _read_head(self) -> None:
        item = next(self._parent)
        self._head, self._head_mask = split_encoded(item)
        self._head_source = item.get("source") if isinstance(item, dict) else None

    def __next__(self) -> dict[str, np.ndarray]:
        tokens = np.zeros(self._length, np.int32)
        segments = np.zeros(self._length, np.int32)
        positions = np.zeros(self._length, np.int32)
        targets = np.zeros(self._length, bool)
        source = np.full(self._length, -1, np.int32)  # mixture source of each token; -1 = padding
        mixed = False
        filled = segment = 0
        while filled < self._length:
            if self._head is None or self._offset >= len(self._head):
                if (filled and not self._concat) or not self._next_document():
                    break
                continue  # re-check: the new document may be empty
            take = min(self._length - filled, len(self._head) - self._offset)
            segment += 1
            tokens[filled:filled + take] = self._head[self._offset:self._offset + take]
            segments[filled:filled + take] = segment
            positions[filled:filled + take] = np.arange(take)
            targets[filled:filled + take] = (True if self._head_mask is None else
                                             self._head_mask[self._offset:self._offset + take])
            if self._head_source is not None:
                source[filled:filled + take], mixed = self._head_source, True
            filled += take
            self._offset += take
        if filled == 0:
            raise StopIteration
        row = {"tokens": tokens, "segment_ids": segments, "positions": positions, "target_mask": targets}
        if mixed or self._head_source is not None:
            row["source"] = source
        return row

    def get_state(self) -> dict[str, Any]:
        return {"parent": copy.deepcopy(self._head_state), "offset": self._offset,
                "has_head": self._head is not None}

    def set_state(self, state: dict[str, Any]) -> None:
        # Re-read (and re-tokenize) the current document rather than storing its tokens.
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._head_state = copy.deepcopy(state["parent"])
        self._head, self._offset = None, 0
        if state["has_head"]:
            self._read_head()
            self._offset = int(state["offset"])


# ---------------------------------------------------------------- row streams


class RoundRobinIterDataset(grain.IterDataset):
    """Rows from several streams in turn: s_0, s_1, ..., s_{k-1}, s_0, ... A finished stream
    contributes all-padding rows; iteration stops at the start of a round once every
    stream has finished, so batches of one round each are always full (the last may be
    all padding).
    Supports grain's in-place slicing, so `mp_prefetch` gives worker w the streams w::W."""

    def __init__(self, streams: Sequence[grain.IterDataset], length: int):
        super().__init__(list(streams))
        self._length = length

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        if sequential_slice:
            raise ValueError("RoundRobinIterDataset needs strided (not sequential) slicing")
        self._parents = tuple(self._parents[sl])

    def __iter__(self) -> "_RoundRobinIterator":
        return _RoundRobinIterator([p.__iter__() for p in self._parents], self._length)

    def __str__(self) -> str:
        return f"RoundRobinIterDataset(streams={len(self._parents)})"


class _RoundRobinIterator(grain.DatasetIterator):
    def __init__(self, streams: list[grain.DatasetIterator], length: int):
        super().__init__(streams)
        self._length = length
        self._next = 0
        self._done = [False] * len(streams)

    def __next__(self) -> dict[str, np.ndarray]:
        if self._next == 0 and all(self._done):
            raise StopIteration
        index = self._next
        self._next = (index + 1) % len(self._parents)
        if not self._done[index]:
            try:
                return next(self._parents[index])
            except StopIteration:
                self._done[index] = True
        zeros = np.zeros(self._length, np.int32)
        return {"tokens": zeros, "segment_ids": zeros.copy(), "positions": zeros.copy(),
                "target_mask": np.zeros(self._length, bool)}

    def get_state(self) -> dict[str, Any]:
        return {"streams": [p.get_state() for p in self._parents], "next": self._next,
                "done": list(self._done)}

    def set_state(self, state: dict[str, Any]) -> None:
        if len(state["streams"]) != len(self._parents):
            raise ValueError(f"iterator state has {len(state['streams'])} row streams, this "
                             f"iterator has {len(self._parents)} (batch_size / shard_count changed?)")
        for parent, sub in zip(self._parents, state["streams"]):
            parent.set_state(sub)
        self._next = int(state["next"])
        self._done = [bool(d) for d in state["done"]]


def to_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stacked (b, T+1) rows -> model inputs. A target counts only if it is in the same
    document as its input (EOS is predicted, the next document's BOS is not) and its
    target_mask is set (instruct data: prompt tokens are context, never targets)."""
    tokens, seg = rows["tokens"], rows["segment_ids"]
    counted = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0) & rows["target_mask"][:, 1:]
    extra = {SOURCE_KEY: np.ascontiguousarray(rows["source"][:, :-1])} if "source" in rows else {}
    return {**extra,
        "inputs": np.ascontiguousarray(tokens[:, :-1], np.int32),
        "targets": np.ascontiguousarray(tokens[:, 1:], np.int32),
        "segment_ids": np.ascontiguousarray(seg[:, :-1], np.int32),
        "positions": np.ascontiguousarray(rows["positions"][:, :-1], np.int32),
        "loss_mask": counted.astype(np.float32),
    }
