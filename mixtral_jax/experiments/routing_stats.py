"""The statistics of the routing analysis, as plain functions of token text and expert ids:
token kinds from Python's own tokenizer, and how often consecutive tokens share experts
compared with what the marginal loads alone would give."""

from __future__ import annotations

import io
import itertools
import keyword
import tokenize
from collections import Counter
from typing import Sequence

import numpy as np

CATEGORIES = ("keyword", "identifier", "whitespace/indent", "punctuation", "string/comment", "other")
KEYWORD, IDENTIFIER, WHITESPACE, PUNCTUATION, STRING, OTHER = range(len(CATEGORIES))
_STRINGY = {tokenize.STRING, tokenize.COMMENT} | {getattr(tokenize, n) for n in
                                                  ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
                                                  if hasattr(tokenize, n)}


def char_categories(source: str) -> np.ndarray | None:
    """Category index of every character of a Python source, from `tokenize`; characters no
    token covers (spaces, indentation) are whitespace. None when the source does not tokenize."""
    cats = np.full(len(source), WHITESPACE, np.int8)
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    offset = lambda row, col: line_starts[row - 1] + col
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME:
                kind = KEYWORD if keyword.iskeyword(tok.string) else IDENTIFIER
            elif tok.type == tokenize.OP:
                kind = PUNCTUATION
            elif tok.type in _STRINGY:
                kind = STRING
            elif tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
                continue
            else:
                kind = OTHER  # numbers, error tokens
            start, end = offset(*tok.start), offset(*tok.end)
            cats[start:end] = kind
    except (tokenize.TokenError, IndentationError, SyntaxError, IndexError):
        return None
    return cats


def token_categories(spans: Sequence[tuple[int, int]], chars: np.ndarray, text: str) -> list[int]:
    """A token's kind: that of its first non-whitespace character (all-space tokens: whitespace)."""
    kinds = []
    for start, end in spans:
        kind = WHITESPACE
        for i in range(start, min(end, len(text))):
            if not text[i].isspace():
                kind = int(chars[i])
                break
        kinds.append(kind)
    return kinds


def consecutive_rates(sequences: Sequence[np.ndarray]) -> tuple[float, float]:
    """sequences: [T_i, k] expert ids per token (top-1 first). Over adjacent pairs within each
    sequence: (share with the same top-1 expert, share whose top-k sets intersect)."""
    same = overlap = pairs = 0
    for ids in sequences:
        ids = np.asarray(ids)
        if len(ids) < 2:
            continue
        a, b = ids[:-1], ids[1:]
        same += int(np.sum(a[:, 0] == b[:, 0]))
        overlap += int(np.sum((a[:, :, None] == b[:, None, :]).any(axis=(1, 2))))
        pairs += len(a)
    return (same / pairs, overlap / pairs) if pairs else (float("nan"), float("nan"))


def chance_rates(sequences: Sequence[np.ndarray]) -> tuple[float, float]:
    """The same two rates if consecutive tokens were drawn independently from the marginals:
    sum_i p_i^2 over top-1 shares p, and sum over pairs of top-k sets (S, T) that intersect of
    q_S q_T, q the share of each set."""
    used = [np.asarray(s) for s in sequences if len(s) >= 2]  # the tokens consecutive_rates counts
    if not used:
        return float("nan"), float("nan")
    rows = np.concatenate(used)
    top1 = Counter(rows[:, 0].tolist())
    p = np.array(list(top1.values()), float) / len(rows)
    sets = Counter(frozenset(r.tolist()) for r in rows)
    keys, q = list(sets), np.array(list(sets.values()), float) / len(rows)
    any_chance = sum(q[i] * q[j] for i, j in itertools.product(range(len(keys)), repeat=2) if keys[i] & keys[j])
    return float(np.sum(p**2)), float(any_chance)
