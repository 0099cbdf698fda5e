"""Which layers are sparse, and how the stacked layers run in order: a model's layers live in
at most two stacks (the sparse blocks and the dense blocks), and the plan cuts the layer
sequence into segments, each a short unit of layers repeated, that one scan runs.

A model with every layer alike is one segment of a one-layer unit (Mixtral: 32 x [sparse]).
DeepSeek's first dense layers make a second segment (3 x [dense], 58 x [sparse]); Qwen's
decoder_sparse_step 2 is one segment of a two-layer unit (24 x [dense, sparse]). So the
number of scans, and the compile time, depends on the pattern's shape, not on depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# Longest repeating unit searched for: a pattern with a longer period runs as shorter segments.
MAX_UNIT = 8


@dataclass(frozen=True)
class Segment:
    """`repeats` times the layers `unit` (True = sparse), starting at global layer `start`."""

    unit: tuple[bool, ...]
    repeats: int
    start: int

    @property
    def layers(self) -> int:
        return len(self.unit) * self.repeats

    def count(self, sparse: bool) -> int:
        """Layers of one kind in one unit."""
        return sum(1 for s in self.unit if s == sparse)


def plan_segments(sparse: Sequence[bool]) -> tuple[Segment, ...]:
    """Cut the per-layer kinds into segments, greedily from the first layer: at each point the
    unit (up to MAX_UNIT layers) repeated at least twice that covers the most layers, the
    shortest on a tie; a single layer where nothing repeats."""
    kinds = tuple(bool(s) for s in sparse)
    segments, i = [], 0
    while i < len(kinds):
        best_unit, best_repeats = 1, 1
        for size in range(1, min(MAX_UNIT, len(kinds) - i) + 1):
            unit = kinds[i:i + size]
            repeats = 1
            while kinds[i + repeats * size:i + (repeats + 1) * size] == unit:
                repeats += 1
            if repeats > 1 and repeats * size > best_unit * best_repeats:
                best_unit, best_repeats = size, repeats
        segments.append(Segment(kinds[i:i + best_unit], best_repeats, i))
        i += best_unit * best_repeats
    return tuple(segments)


def plan_model(n_layers: int, is_moe: bool, first_dense: int, every: int,
               dense_layers: Sequence[int]) -> tuple[Segment, ...]:
    """The segments of a model's layer pattern (ModelConfig.sparse_layers' rule). The regular
    patterns (first k dense, then every n-th layer sparse) are cut by arithmetic, so a config
    naming billions of layers plans in constant time; an explicit dense_layers list is cut
    from the listed kinds by plan_segments."""
    if not is_moe:
        return (Segment((False,), n_layers, 0),)
    if dense_layers:
        return plan_segments([i >= first_dense and (i + 1) % every == 0 and i not in set(dense_layers)
                              for i in range(n_layers)])
    segments, start = [], min(first_dense, n_layers)
    if start:
        segments.append(Segment((False,), start, 0))
    unit = tuple((i + 1) % every == 0 for i in range(start, start + every))
    repeats = (n_layers - start) // every
    if repeats:
        segments.append(Segment(unit, repeats, start))
    for i in range(start + repeats * every, n_layers):  # fewer than `every` layers left
        segments.append(Segment(((i + 1) % every == 0,), 1, i))
    return tuple(segments)


def stack_index(sparse: Sequence[bool]) -> list[tuple[bool, int]]:
    """Per global layer: (its kind, its index within that kind's stack)."""
    seen = {True: 0, False: 0}
    out = []
    for s in sparse:
        out.append((bool(s), seen[bool(s)]))
        seen[bool(s)] += 1
    return out
