"""Dispatch paths: dense / capacity / dropless agree (outputs and gradients) when nothing is
dropped; capacity drops exactly the lowest-weight slots; expert choice against a numpy loop."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from mixtral_jax.kernels.grouped import CPU, RAGGED, ragged_slot_swiglu
from mixtral_jax.models.dispatch import Experts, capacity, dense, dropless, expert_choice_dispatch
from mixtral_jax.kernels.grouped_cpu import (
    BATCHED_ROW_COST,
    block_size,
    blocked_slot_swiglu,
    cpu_capacity,
    cpu_slot_swiglu,
    laid_out_slot_swiglu,
    overflow_fits,
    prefers_fitted,
    _units,
)
from mixtral_jax.kernels.rows import padded_block_count
from mixtral_jax.models.routing import capacity_size, expert_choice, topk_softmax


def make_inputs(seed, n, d, h, e, case="random"):
    """x [n, d], router logits [n, e] and expert weights. case: `empty` = expert 0 never chosen,
    `all` = expert e-1 chosen by every token."""
    rng = np.random.default_rng(seed)  # numpy: eager jax.random costs a compile per shape
    x = rng.normal(size=(n, d))
    logits = 2.0 * rng.normal(size=(n, e))
    if case == "empty":
        logits[:, 0] = -30.0
    if case == "all":
        logits[:, e - 1] = 30.0
    w_gate, w_up = rng.normal(size=(2, e, d, h)) / np.sqrt(d)
    w_down = rng.normal(size=(e, h, d)) / np.sqrt(h)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    x, logits, experts = f32(x), f32(logits), Experts(f32(w_gate), f32(w_up), f32(w_down))
    return x, logits, experts


def np_swiglu(x, w_gate, w_up, w_down):
    gate, up = x @ w_gate, x @ w_up
    return (gate / (1 + np.exp(-gate)) * up) @ w_down


def as_np(experts):
    return [np.asarray(w, np.float64) for w in experts]


# Every dispatch path a CPU can run: the grouped SwiGLU of the CPU and of TPUs (ragged_dot).
PATHS = {
    "dense": dense,
    "capacity": lambda x, r, ex: capacity(x, r, ex, capacity_factor=float(ex.w_gate.shape[0]), grouped=CPU),  # C = N
    "dropless": lambda x, r, ex: dropless(x, r, ex, grouped=CPU),
    "dropless_ragged": lambda x, r, ex: dropless(x, r, ex, grouped=RAGGED),
}


def run_path(path, x, logits, experts, k):
    """y, dropped fraction and grads of sum(sin(y)) w.r.t. (x, logits, experts), jitted."""
    def loss(x, logits, experts):
        y, dropped = PATHS[path](x, topk_softmax(logits, k), experts)
        return jnp.sum(jnp.sin(y)), (y, dropped)

    (_, (y, dropped)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, logits, experts)
    return y, dropped, jax.tree.leaves(grads)


@pytest.mark.parametrize("seed,n,d,h,e,k,case", [
    (0, 24, 8, 12, 4, 2, "random"),
    (1, 40, 16, 8, 8, 1, "random"),
    (2, 33, 8, 16, 6, 3, "empty"),
    (3, 20, 12, 8, 4, 2, "all"),
])
def test_three_dispatch_paths_agree(seed, n, d, h, e, k, case):
    x, logits, experts = make_inputs(seed, n, d, h, e, case)
    results = {path: run_path(path, x, logits, experts, k) for path in PATHS}
    ids = np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :k]
    if case == "empty":
        assert not np.any(ids == 0)
    if case == "all":
        assert np.all(np.any(ids == e - 1, axis=1))
    y_ref, _, g_ref = results["dense"]
    for path, (y, dropped, grads) in results.items():
        assert float(dropped) == 0.0, path
        np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5, err_msg=path)
        for g, want in zip(grads, g_ref):
            np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-4, atol=1e-5, err_msg=path)
        if case == "empty":  # an expert with no tokens gets exactly zero gradient
            assert not np.any(np.asarray(grads[2])[0]), path


@pytest.mark.parametrize("case,block", [("random", 4), ("empty", 16), ("all", 8)])
def test_blocked_slot_swiglu_equals_ragged_dot(case, block):
    """The CPU grouped matmul (small blocks: several per expert, partial ones, an expert without
    tokens) against ragged_dot, outputs and gradients."""
    x, logits, experts = make_inputs(7, 30, 8, 12, 4, case)
    ids = jnp.asarray(np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :2])
    cot = jnp.asarray(np.random.default_rng(8).normal(size=(30, 2, 8)), jnp.float32)

    def value_and_grads(impl):
        loss = lambda x, experts: jnp.sum(impl(x, ids, *experts) * cot)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, experts)

    got = value_and_grads(lambda *a: blocked_slot_swiglu(*a, block=block))
    want = value_and_grads(ragged_slot_swiglu)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    out = jax.jit(lambda x: blocked_slot_swiglu(x, ids, *experts, block=block))(x)
    w_gate, w_up, w_down = as_np(experts)
    e = int(ids[5, 1])
    want = np_swiglu(np.asarray(x[5], np.float64), w_gate[e], w_up[e], w_down[e])
    np.testing.assert_allclose(np.asarray(out[5, 1]), want, rtol=1e-4, atol=1e-5)


def grads_against_ragged(impl, ids, x, experts, seed=8):
    """Outputs and gradients (x, weights) of impl and of ragged_dot under one random cotangent."""
    cot = jnp.asarray(np.random.default_rng(seed).normal(size=(*ids.shape, x.shape[1])), jnp.float32)

    def value_and_grads(f):
        loss = lambda x, experts: jnp.sum(f(x, ids, *experts) * cot)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, experts)

    for g, w in zip(jax.tree.leaves(value_and_grads(impl)), jax.tree.leaves(value_and_grads(ragged_slot_swiglu))):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case,cap,block", [
    ("random", 3, 4),  # most experts over capacity: batched region full, several overflow runs
    ("balanced", 16, 4),  # 15 slots per expert, nothing overflows: no run at all
    ("empty", 5, 8),  # an expert without tokens: an empty batched row and no run
    ("all", 6, 4),  # one expert takes every token: its overflow spans several runs
])
def test_fitted_layout_equals_ragged_dot(case, cap, block):
    """Batched first-C slots plus runs for the rest, in the shared row buffer: every slot once."""
    n, e = 30, 4
    x, logits, experts = make_inputs(11, n, 8, 12, e, "random" if case == "balanced" else case)
    if case == "balanced":
        ids = jnp.asarray(np.stack([np.arange(n) % e, (np.arange(n) + 1) % e], 1), jnp.int32)
    else:
        ids = jnp.asarray(np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :2])
    region = padded_block_count(2 * n, e, block // 2) * (block // 2) - e * cap
    assert bool(overflow_fits(jnp.bincount(ids.reshape(-1), length=e), cap, block // 2, region))
    fitted = lambda *a: laid_out_slot_swiglu(*a, fitted=jnp.array(True), capacity=cap, block=block)
    grads_against_ragged(fitted, ids, x, experts)
    out = np.asarray(jax.jit(lambda x: fitted(x, ids, *experts))(x))
    w_gate, w_up, w_down = as_np(experts)
    for t, j in [(0, 0), (17, 1), (29, 1)]:  # early slots land in the batch, late ones may overflow
        ex = int(ids[t, j])
        want = np_swiglu(np.asarray(x[t], np.float64), w_gate[ex], w_up[ex], w_down[ex])
        np.testing.assert_allclose(out[t, j], want, rtol=1e-4, atol=1e-5)


def test_fitted_layout_rejects_a_batched_region_larger_than_the_row_buffer():
    x, logits, experts = make_inputs(11, 30, 8, 12, 4)
    ids = jnp.asarray(np.argsort(-np.asarray(logits), axis=-1, kind="stable")[:, :2])
    # 60 slots in half-blocks of 2 rows: a 64-row buffer; 4 experts x 17 rows do not fit
    with pytest.raises(ValueError, match="batched region"):
        laid_out_slot_swiglu(x, ids, *experts, fitted=jnp.array(True), capacity=17, block=4)


def test_overflow_fits_by_hand_counted_rows():
    # capacity 8, half-blocks of 2: expert 0's 6 rows over capacity need 6 rows of the region
    assert bool(overflow_fits(jnp.array([14, 2, 2, 2]), 8, 2, 6))
    assert not bool(overflow_fits(jnp.array([14, 2, 2, 2]), 8, 2, 5))
    # 3 rows over capacity round up to 4 (two half-blocks), 1 row to 2: 6 rows
    assert not bool(overflow_fits(jnp.array([11, 9, 2, 2]), 8, 2, 5))


def test_block_loop_units_cover_each_experts_half_blocks_by_hand():
    # half-blocks owned: expert 0 -> 0..4 (5 = 101b), expert 1 none, expert 2 -> 5..7 (3 = 011b),
    # expert 3 -> 8 (1); h = 2 rows. One run of 2^j half-blocks per set bit j, smaller runs first.
    units = _units(jnp.array([0, 5, 5, 8, 9]), 2, 3)
    runs = {j: sorted(zip(np.asarray(units.row[j])[:int(units.count[j])].tolist(),
                          np.asarray(units.expert[j])[:int(units.count[j])].tolist())) for j in range(3)}
    assert runs[0] == [(0, 0), (10, 2), (16, 3)]  # half-blocks 0, 5, 8
    assert runs[1] == [(12, 2)]  # half-blocks 6..7
    assert runs[2] == [(2, 0)]  # half-blocks 1..4


def test_prefers_fitted_by_hand_counted_rows():
    # 4 experts of 5 rows, capacity 8, blocks of 4: fitted 0.96 * 32 rows, blocked 4 * 8 = 32 rows
    assert bool(prefers_fitted(jnp.array([5, 5, 5, 5]), 8, 4)) == (BATCHED_ROW_COST * 32 < 32)
    # one expert with 14 of 20 rows: fitted 0.96 * 32 + 8 overflow rows; blocked 16 + 3 * 4 = 28
    assert not bool(prefers_fitted(jnp.array([14, 2, 2, 2]), 8, 4))


@pytest.mark.parametrize("n,skewed", [(64, False), (512, True)])
def test_cpu_slot_swiglu_either_layout_equals_ragged_dot(n, skewed):
    """The on-device choice: 32 slots per expert (under one 128-row block each) take the fitted
    layout; two experts taking every token (512 rows each, 1024 rows in blocks against 4 x 288
    batched rows plus 2 x 256 overflow rows) the block layout. Both equal ragged_dot."""
    x, _, experts = make_inputs(12, n, 8, 12, 4)
    tokens = np.arange(n)
    ids = np.stack([np.full(n, 3), np.full(n, 2)] if skewed else [tokens % 4, (tokens + 1) % 4], 1)
    ids = jnp.asarray(ids, jnp.int32)
    sizes = jnp.bincount(ids.reshape(-1), length=4)
    assert bool(prefers_fitted(sizes, cpu_capacity(2 * n, 4, n), block_size(2 * n, 4))) == (not skewed)
    grads_against_ragged(cpu_slot_swiglu, ids, x, experts)


def test_capacity_size_formula():
    assert capacity_size(4096, 2, 8, 1.25) == 1280  # ceil(2 * 4096 / 8 * 1.25)
    assert capacity_size(12, 2, 4, 0.4) == 3  # ceil(2.4)
    assert capacity_size(100, 1, 10, 1.1) == 11  # float noise 11.000000000000002 is not rounded up
    assert capacity_size(10, 2, 4, 100.0) == 10  # never more than N
    assert capacity_size(10, 1, 64, 0.01) == 1  # never less than 1


def np_capacity_moe(x, ids, weights, experts, cap):
    """The drop rule as a loop: per expert, slots sorted by weight (descending), then token,
    then slot; the first `cap` are kept."""
    w_gate, w_up, w_down = as_np(experts)
    y = np.zeros((x.shape[0], x.shape[1]))
    kept = 0
    for e in range(w_gate.shape[0]):
        slots = [(n, j) for n in range(ids.shape[0]) for j in range(ids.shape[1]) if ids[n, j] == e]
        slots.sort(key=lambda s: (-weights[s], s[0], s[1]))
        for n, j in slots[:cap]:
            y[n] += weights[n, j] * np_swiglu(x[n], w_gate[e], w_up[e], w_down[e])
            kept += 1
    return y, 1.0 - kept / ids.size


@pytest.mark.parametrize("factor", [0.3, 0.5, 0.75])
def test_capacity_drops_lowest_weight_slots(factor):
    """At 0.5 (C=4) the cut falls inside expert 2's tie of tokens 3, 9, 12 and at 0.75 (C=6)
    inside expert 0's: the earlier token is kept."""
    n, e, k = 16, 4, 2
    x, logits, experts = make_inputs(11, n, 8, 12, e)
    logits = np.asarray(logits).copy()
    logits[:, 0] += 2.0  # crowd expert 0 so it overflows
    logits[[9, 12]] = logits[3]  # identical tokens: weight ties
    logits = jnp.asarray(logits)
    routing = jax.jit(topk_softmax, static_argnums=1)(logits, k)
    y, dropped = jax.jit(lambda x, r, ex: capacity(x, r, ex, capacity_factor=factor, grouped=CPU))(x, routing, experts)
    cap = capacity_size(n, k, e, factor)
    want, want_dropped = np_capacity_moe(np.asarray(x, np.float64), np.asarray(routing.expert_ids),
                                         np.asarray(routing.weights, np.float64), experts, cap)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(dropped), want_dropped, rtol=1e-6)
    assert want_dropped > 0.0


@pytest.mark.parametrize("factor", [0.5, 2.0])
def test_expert_choice_dispatch_matches_numpy_and_dense(factor):
    n, e = 20, 4
    x, logits, experts = make_inputs(5, n, 8, 12, e)
    routing = jax.jit(expert_choice, static_argnums=1)(logits, factor)
    y, unpicked = jax.jit(expert_choice_dispatch)(x, routing, experts)
    w_gate, w_up, w_down = as_np(experts)
    xs = np.asarray(x, np.float64)
    want = np.zeros_like(xs)
    token_idx, gates = np.asarray(routing.token_idx), np.asarray(routing.gates, np.float64)
    for ex in range(e):
        for tok, gate in zip(token_idx[ex], gates[ex]):
            want[tok] += gate * np_swiglu(xs[tok], w_gate[ex], w_up[ex], w_down[ex])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-5)
    assert float(unpicked) == pytest.approx(np.mean(~np.isin(np.arange(n), token_idx)))

    def loss(dispatch, x, logits, experts):
        return jnp.sum(jnp.sin(dispatch(x, expert_choice(logits, factor), experts)[0]))

    grads = [jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(x, logits, experts)
             for fn in (expert_choice_dispatch, dense)]
    for g, w in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
