"""The ragged expert exchange (parallel/expert_parallel.py, GPU and TPU). XLA:CPU does not run
`ragged_all_to_all`, so: its index arithmetic (send sizes, offsets both ways) is checked against
a numpy loop that follows jax's documented semantics of the collective; the whole strategy runs
on CPU meshes with the collective emulated by all_to_all, against the single-device dispatchers
(outputs, dropped fractions, gradients); and the real collective is traced and lowered."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from meshes import mesh_of
from mixtral_jax.kernels.grouped import CPU
from mixtral_jax.kernels.rows import take_rows
from mixtral_jax.models.dispatch import Experts, capacity, dropless
from mixtral_jax.models.routing import TokenChoice
from mixtral_jax.parallel.expert_parallel import RaggedExchange, exchange_bytes, exchange_rows, ragged_offsets, \
    ragged_plan
from mixtral_jax.parallel.mesh import BATCH_AXES, traced_under
from test_expert_parallel import _assert_equal_runs, _problem


def _simulate(operands, outputs, args):
    """jax's ragged_all_to_all pseudocode, one numpy loop over every (sender, peer) pair."""
    results = [o.copy() for o in outputs]
    for src, (operand, (in_off, send, out_off, _)) in enumerate(zip(operands, args)):
        for dst in range(len(operands)):
            rows = operand[in_off[dst]:in_off[dst] + send[dst]]
            assert args[dst][3][src] == send[dst]  # the receiver expects what is sent
            results[dst][out_off[dst]:out_off[dst] + send[dst]] = rows
    return results


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_and_offsets_deliver_every_slot_to_its_expert_and_back(seed):
    rng = np.random.default_rng(seed)
    devices, local, n, k = 4, 2, 6, 2
    ids = rng.integers(0, devices * local, (devices, n, k))
    if seed == 1:
        ids[:, :, 0] = 0  # skewed: every token's first slot goes to device 0
    keep = rng.random((devices, n, k)) > 0.2
    plans = [jax.tree.map(np.asarray, ragged_plan(jnp.asarray(ids[d]), jnp.asarray(keep[d]), local, devices))
             for d in range(devices)]
    sizes = np.stack([p.send_sizes for p in plans])
    offs = [jax.tree.map(np.asarray, ragged_offsets(jnp.asarray(sizes), d)) for d in range(devices)]
    # each send row tagged with (device, slot, local expert); n * k marks an unused row
    sends = [np.stack([np.full(n * k, d), np.where(p.token_of_row < n, np.argsort(p.place), n * k), p.local_id], 1)
             for d, p in enumerate(plans)]
    recv_rows = devices * n * k
    recvs = _simulate(sends, [np.full((recv_rows, 3), -1)] * devices,
                      [(o.send_offsets, p.send_sizes, o.output_offsets, o.recv_sizes) for p, o in zip(plans, offs)])
    for d in range(devices):
        want = [(s, slot, e % local) for s in range(devices) for e in range(d * local, (d + 1) * local)
                for slot in range(n * k) if keep[s].reshape(-1)[slot] and ids[s].reshape(-1)[slot] == e]
        got = recvs[d][: len(want)]
        assert [tuple(r) for r in got] == want  # in source order, then expert, then slot
        assert (recvs[d][len(want):] == -1).all()
    backs = _simulate(recvs, [np.full((n * k, 3), -1)] * devices,
                      [(o.recv_offsets, o.recv_sizes, o.back_offsets, p.send_sizes) for p, o in zip(plans, offs)])
    for d, p in enumerate(plans):
        for slot in range(n * k):
            if keep[d].reshape(-1)[slot]:
                assert tuple(backs[d][p.place[slot]][:2]) == (d, slot)
            else:
                assert p.place[slot] == n * k  # not sent: reads a zero row


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """ragged_all_to_all from all_to_all: every peer's slice padded to the operand's rows."""
    peers, rows = jax.lax.axis_size(axis_name), operand.shape[0]
    r = jnp.arange(rows)
    pick = jnp.where(r < send_sizes[:, None], input_offsets[:, None] + r, rows)  # [X, rows]
    chunks = take_rows(operand, pick.reshape(-1))
    got = jax.lax.all_to_all(chunks, axis_name, 0, 0, tiled=True)  # peer i's slice at rows i * rows ...
    where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dest = jnp.where(r < recv_sizes[:, None], where[:, None] + r, output.shape[0])
    return output.at[dest.reshape(-1)].set(got, mode="drop")


EMULATED = RaggedExchange(emulated_ragged_all_to_all)
MESHES = [dict(fsdp=2, tensor=2, expert=2), dict(data=2, expert=4), dict(expert=8)]


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_ragged_exchange_equals_single_device(sizes):
    _assert_equal_runs(functools.partial(dropless, grouped=CPU, exchange=EMULATED), sizes, seed=1, skew=True)
    dispatch = functools.partial(capacity, capacity_factor=0.75, grouped=CPU, exchange=EMULATED)
    assert _assert_equal_runs(dispatch, sizes) > 0


def test_the_real_collective_traces_and_lowers_with_smaller_buffers():
    x, weights, ids, experts = _problem(0)
    mesh = mesh_of(dict(expert=8))
    fn = traced_under(mesh, lambda x, w: dropless(x, TokenChoice(w, ids), Experts(*experts), grouped=CPU,
                                                  exchange=RaggedExchange())[0])
    tokens = NamedSharding(mesh, P(BATCH_AXES))
    text = jax.jit(fn).lower(jax.device_put(x, tokens), jax.device_put(weights, tokens)).as_text()
    assert text.count("ragged_all_to_all") == 3  # rows and ids out, results back
    n_slots = ids.size // 8
    padded, ragged = (exchange_rows(s, n_slots, 8, n_slots, 8 * n_slots) for s in ("padded", "ragged"))
    assert ragged["send"] * 8 == padded["send"] and ragged["receive"] == padded["receive"]
    sized = exchange_bytes(n_slots // 2, 2, 8, 8, 16, 2)  # bytes: rows x dim x itemsize
    assert sized["ragged"]["send"] == n_slots * 16 * 2 and sized["padded"]["return"] == 8 * n_slots * 16 * 2
    capped = exchange_bytes(n_slots // 2, 2, 8, 8, 16, 2, capacity=3)  # 1 expert per device x 3 slots
    assert capped["ragged"]["receive"] == 3 * 32 and capped["padded"]["receive"] == 8 * 3 * 32
