"""cuDNN's segment layout for packed documents (kernels/packed_attention.py): the lengths / offsets
against a loop over the packer's rows, the attention that layout describes against the model's
document mask, and which branch the bounds pick. The cuDNN kernel itself needs a Hopper GPU:
benchmarks/attention.py checks it there against the plain attention in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixtral_jax.kernels import packed_attention as packed
from mixtral_jax.models.attention import attention_mask


def packed_batch(doc_counts: list[int], t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `doc_counts[b]` documents of random lengths filling t tokens, every other row
    ending in padding (segment 0, position 0), as the packer writes them."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((len(doc_counts), t), np.int32)
    positions = np.zeros((len(doc_counts), t), np.int32)
    for row, docs in enumerate(doc_counts):
        end = t - (row % 2) * rng.integers(1, 8)  # padding after `end`
        cuts = np.sort(rng.choice(np.arange(1, end), size=docs - 1, replace=False)) if docs > 1 else []
        bounds = [0, *cuts, end]
        for doc, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            segments[row, lo:hi] = doc + 1
            positions[row, lo:hi] = np.arange(hi - lo)
    return segments, positions


def loop_layout(segments: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, bool]:
    lengths, offsets = -np.ones((len(segments), m), np.int32), -np.ones((len(segments), m + 1), np.int32)
    fits = True
    for row, ids in enumerate(segments):
        runs, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1]:
                runs.append((start, i - start))
                start = i
        fits &= len(runs) <= m
        for j, (begin, length) in enumerate(runs[:m]):
            offsets[row, j], lengths[row, j] = begin, length
    return lengths, offsets, fits


@pytest.mark.parametrize("m", [3, 5, 8])
def test_segment_layout_matches_a_loop_over_the_rows(m):
    segments, _ = packed_batch([1, 3, 5, 4, 2], t=64)  # 1, 3 + padding, 5, 4 + padding, 2 segments
    lengths, offsets, fits = packed.segment_layout(jnp.asarray(segments), m)
    want_lengths, want_offsets, want_fits = loop_layout(segments, m)
    assert bool(fits) == want_fits == (m >= 5)
    if want_fits:  # an overflowing row's layout is incomplete by contract; the bound's cond skips it
        np.testing.assert_array_equal(np.asarray(lengths), want_lengths)
        np.testing.assert_array_equal(np.asarray(offsets), want_offsets)


def test_the_layout_describes_the_document_mask_on_every_real_token():
    """Causal within each [offset, offset + length) run, by index, is the model's rule (same
    segment, key position <= query position) wherever the query is a document token."""
    t = 48
    segments, positions = packed_batch([1, 4, 6, 2], t=t, seed=3)
    lengths, offsets, fits = (np.asarray(a) for a in packed.segment_layout(jnp.asarray(segments), 8))
    assert fits
    mask = np.asarray(attention_mask(*(jnp.asarray(a) for a in (positions, positions, segments, segments)), None))
    for row in range(len(segments)):
        run = np.full(t, -1)
        for j in range(lengths.shape[1]):
            if lengths[row, j] > 0:
                run[offsets[row, j]:offsets[row, j] + lengths[row, j]] = j
        assert (run >= 0).all(), "every token, padding too, is in one segment"
        layout_mask = (run[:, None] == run[None, :]) & (np.arange(t)[None, :] <= np.arange(t)[:, None])
        real = segments[row] > 0
        np.testing.assert_array_equal(layout_mask[real], mask[row][real])


def test_the_first_bound_every_row_fits_runs_else_the_mask(monkeypatch):
    """A fake kernel returns its bound M everywhere and the mask path zeros, so the output names
    the branch that ran."""
    monkeypatch.setattr(packed, "packed_attention",
                        lambda q, k, v, lengths, offsets, window: jnp.full(q.shape, float(lengths.shape[1])))
    q = jnp.ones((2, 80, 4, 8))
    kv = jnp.ones((2, 80, 2, 8))

    def masked(q, k, v):
        return jnp.zeros(q.shape)

    def branch(doc_counts, bounds=(8, 32)):
        segments, _ = packed_batch(doc_counts, t=80)
        out = jax.jit(lambda q, k, v: packed.packed_or_masked(q, k, v, jnp.asarray(segments), None, masked,
                                                              bounds))(q, kv, kv)
        assert float(out.min()) == float(out.max()), "one branch for the whole batch"
        return float(out[0, 0, 0, 0])

    assert branch([8, 3]) == 8.0  # row 1: 3 documents and padding
    assert branch([9, 3]) == 32.0  # one row over the first bound moves the batch to the next
    assert branch([32, 1]) == 32.0
    assert branch([33, 1]) == 0.0  # past every bound: the mask
    assert branch([3, 7]) == 8.0 and branch([3, 8]) == 32.0  # padding is a segment too
    assert branch([3, 1], bounds=()) == 0.0
    assert packed.supported() is False, "CPU: the model never takes the cuDNN layout here"
