"""How scoring requests become a few fixed-shape device batches.

Every batch the adapter sends to the device has `rows` rows of `length` tokens, with `length`
one of a handful of buckets (powers of two from `MIN_BUCKET`, capped at the model's context), so
a whole task compiles one program per bucket it touches, not one per request. Rows are sorted
longest first (lm-eval's Collator order), so each batch's bucket is set by its first row and the
padding within a batch stays small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

MIN_BUCKET = 16  # the shortest padded length: below it a shorter program saves nothing measurable


def power_of_two(n: int, smallest: int = MIN_BUCKET) -> int:
    """The least power of two >= n, and >= `smallest`."""
    length = smallest
    while length < n:
        length *= 2
    return length


def bucket_length(n: int, cap: int, smallest: int = MIN_BUCKET) -> int:
    """The padded length for `n` tokens: the next power of two from `smallest` up, at most `cap`
    (the model's context; `n` itself must fit it)."""
    if not 0 < n <= cap:
        raise ValueError(f"{n} tokens do not fit a context of {cap}")
    return min(power_of_two(n, smallest), cap)


def rows_for(length: int, batch_size: int, max_batch_tokens: int | None) -> int:
    """Rows per batch at this padded length: `batch_size`, halved (a power-of-two split, so each
    bucket still has one shape) while rows x length exceeds `max_batch_tokens`."""
    rows = batch_size
    while max_batch_tokens and rows > 1 and rows * length > max_batch_tokens:
        rows = (rows + 1) // 2
    return rows


@dataclass
class Row:
    """One distinct model input and the requests it answers: requests whose inputs (context +
    continuation without its last token, truncated to the context) are equal differ only in the
    last target token, so one forward serves them all (lm-eval's one-token continuation cache)."""

    inputs: tuple[int, ...]
    members: list[int] = field(default_factory=list)  # request indices


def group_rows(inputs: Sequence[Sequence[int]]) -> list[Row]:
    """Requests with equal inputs share one Row, in lm-eval's Collator order: longest first,
    ties by the tokens themselves."""
    rows: dict[tuple[int, ...], Row] = {}
    for index, tokens in enumerate(inputs):
        key = tuple(tokens)
        rows.setdefault(key, Row(key)).members.append(index)
    return sorted(rows.values(), key=lambda row: (-len(row.inputs), row.inputs))


def batches(items: Sequence, lengths: Sequence[int], cap: int, batch_size: int,
            max_batch_tokens: int | None = None) -> Iterator[tuple[int, int, list]]:
    """(padded length, rows per batch, items) for consecutive runs of `items`, already sorted
    longest first (`lengths` are their token counts): each batch takes as many items as its
    bucket's row count allows."""
    start = 0
    while start < len(items):
        length = bucket_length(lengths[start], cap)
        rows = rows_for(length, batch_size, max_batch_tokens)
        yield length, rows, list(items[start:start + rows])
        start += rows
