"""How scoring requests become a few fixed-shape device batches.

Requests whose model input is the same (context + continuation without its last token: the
choices of a multiple-choice question with one-token answers) form one `Group`, scored by one
pass over that input, as lm-eval's HF backend shares them. Groups, longest first (lm-eval's
Collator order), are packed into rows of a fixed length as separate documents (their own
positions and segment ids, so none attends to another): a row holds the longest group left and
then the longest that still fit, first-fit decreasing, so rows carry little padding whatever the
spread of lengths.

Every batch has `rows_for(L)` rows of length L, with L a power of two from `MIN_BUCKET` (capped
at the model's context): the bucket of the longest group, kept for the later, shorter groups
until they are `SHRINK` times shorter than L. Only the positions whose next token is scored
need the output projection (vocabulary-sized, a quarter of a small model's FLOPs): groups that
need it at no more than a quarter (or half) of their tokens, the usual question + answer, are
packed apart, into rows that compute it at L / 4 (L / 2) positions. A task then compiles a few
programs, not one per request length.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterator, Sequence

MIN_BUCKET = 16  # the shortest row: below it a shorter program saves nothing measurable
SHRINK = 4  # a new, shorter row length once the longest group left is this many times shorter
HEAD_SHARES = (4, 2, 1)  # rows compute logits at 1 / share of their positions


def power_of_two(n: int, smallest: int = MIN_BUCKET) -> int:
    """The least power of two >= n, and >= `smallest`."""
    length = smallest
    while length < n:
        length *= 2
    return length


def bucket_length(n: int, cap: int, smallest: int = MIN_BUCKET) -> int:
    """The row length for an input of `n` tokens: the next power of two from `smallest` up, at
    most `cap` (the model's context; `n` itself must fit it)."""
    if not 0 < n <= cap:
        raise ValueError(f"{n} tokens do not fit a context of {cap}")
    return min(power_of_two(n, smallest), cap)


def rows_for(length: int, batch_size: int, max_batch_tokens: int | None) -> int:
    """Rows per batch at this row length: `batch_size`, halved (a power-of-two split, so each
    length still has one shape) while rows x length exceeds `max_batch_tokens`."""
    rows = batch_size
    while max_batch_tokens and rows > 1 and rows * length > max_batch_tokens:
        rows = (rows + 1) // 2
    return rows


@dataclass
class Group:
    """One distinct model input and the requests (indices) it answers. Requests with equal
    inputs differ only in their last target token, so one pass serves them all."""

    inputs: tuple[int, ...]
    members: list[int] = field(default_factory=list)
    head: int = 1  # positions (the input's last ones) whose next-token logits the members read

    @property
    def head_share(self) -> int:
        """4, 2 or 1: needs logits at no more than 1 / share of its positions (a question's answer
        after its context: 4 or 2), so it is packed with groups of its share into rows that
        compute the output projection at 1 / share of their positions."""
        return next(share for share in HEAD_SHARES if share * self.head <= len(self.inputs))


def group_inputs(inputs: Sequence[Sequence[int]], spans: Sequence[int]) -> list[Group]:
    """Requests with equal (non-empty) inputs share a Group, longest first, ties by the tokens
    (lm-eval's Collator order). `spans`: each request's continuation length, whose last tokens
    are what it scores; a group's `head` is the longest (the positions it needs logits at). A
    group holds at most 3 x head + 1 requests (more become further groups), so a row's queries
    (head - 1 shared, one per request) stay within 4x its head positions."""
    shared: dict[tuple[int, ...], list[int]] = {}
    for index, tokens in enumerate(inputs):
        if tokens:
            shared.setdefault(tuple(tokens), []).append(index)
    groups = []
    for key, members in shared.items():
        members = sorted(members, key=lambda m: (-spans[m], m))
        while members:
            head = min(spans[members[0]], len(key))
            groups.append(Group(key, members[:3 * head + 1], head))
            members = members[3 * head + 1:]
    return sorted(groups, key=lambda g: (-len(g.inputs), g.inputs))


def pack(groups: Sequence[Group], cap: int, batch_size: int,
         max_batch_tokens: int | None = None) -> Iterator[tuple[int, list[list[Group]]]]:
    """(row length L, rows) per batch, every group once: `groups` sorted longest first (as
    group_inputs returns them) packed into at most rows_for(L) rows whose lengths sum to <= L."""
    by_length: dict[int, list[Group]] = {}
    for group in reversed(groups):  # each list's last element is its first in order: pop() takes it
        by_length.setdefault(len(group.inputs), []).append(group)
    lengths = sorted(by_length)

    def take(limit: int) -> Group | None:
        """The first of the longest groups left that have at most `limit` tokens."""
        i = bisect.bisect_right(lengths, limit) - 1
        if i < 0:
            return None
        n = lengths[i]
        group = by_length[n].pop()
        if not by_length[n]:
            del by_length[n]
            lengths.pop(i)
        return group

    length = 0
    while lengths:
        if not length or SHRINK * lengths[-1] <= length:
            length = bucket_length(lengths[-1], cap)
        rows: list[list[Group]] = []
        for _ in range(rows_for(length, batch_size, max_batch_tokens)):
            row, free = [], length
            while (group := take(free)) is not None:
                row.append(group)
                free -= len(group.inputs)
            if not row:
                break
            rows.append(row)
        yield length, rows


def batches(items: Sequence, lengths: Sequence[int], cap: int, batch_size: int,
            max_batch_tokens: int | None = None) -> Iterator[tuple[int, int, list]]:
    """Unpacked batches for generation, one prompt per row: (padded length, rows per batch,
    items) over consecutive runs of `items`, sorted longest first (`lengths` their token counts),
    each batch as many as its length's row count allows."""
    start = 0
    while start < len(items):
        length = bucket_length(lengths[start], cap)
        rows = rows_for(length, batch_size, max_batch_tokens)
        yield length, rows, list(items[start:start + rows])
        start += rows
