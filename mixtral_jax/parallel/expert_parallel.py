"""Expert parallelism: the MoE's expert computation under `shard_map`, tokens exchanged with
all-to-all over the mesh's `expert` axis so every device runs only its own experts.

Used by the `dropless` and `capacity` dispatchers whenever they are traced under a mesh (the
train and eval steps enter their mesh while tracing; with `expert` = 1 the exchange is local);
with no mesh, or when the shapes do not split evenly, they run the single-device code unchanged.

Only the expert matmuls move into shard_map. Routing, the capacity decision and every router
statistic (f, P, z-loss, expert load for the loss-free bias, dropped fraction) stay global
arrays that XLA's SPMD partitioner reduces over all shards, so they equal the single-device
values by construction; the tests check the losses and metrics on five meshes.

Per device (expert axis size X, local experts E_l = E / X, n local tokens, top-k):
1. sort the n * k (token, expert) slots by expert; slot s goes to the device holding its expert,
   d = expert // E_l, into row `rank` of a [X, B, D] send buffer (B rows per destination);
2. all_to_all: device j receives the rows every device sent it, with their local expert ids;
3. grouped SwiGLU over the received rows (padding rows are zero rows with id E_l, in no group:
   they add no blocks to CPU's block loop, though they may fill the last expert's final partial
   block, where SwiGLU(0) = 0 and nothing reads them back), hidden dim split over `tensor` and
   summed (Megatron);
4. all_to_all back; each slot reads its row and the top-k outputs are combined with the weights.
B = n * k for `dropless` (a device may route all its slots to one expert group, so nothing can
be dropped; X times the send buffer of a balanced exchange) and min(n * k, E_l * C) for
`capacity`, whose global per-expert capacity C bounds what any expert receives. A
`ragged_all_to_all` exchange would send only the real rows; it is not used because XLA:CPU,
where every path here is tested, does not implement it.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mixtral_jax.kernels.grouped import SlotSwiGLU
from mixtral_jax.kernels.rows import combine_slots, take_rows
from mixtral_jax.parallel.mesh import BATCH_AXES

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"
FSDP_AXIS = "fsdp"


def dispatch_mesh(num_tokens: int, num_experts: int):
    """The mesh being traced under when tokens and experts split evenly over it, else None.

    Any mesh, not only one with an expert axis: with `expert` = 1 the exchange is local and
    each device runs the grouped matmul over its own tokens only, where SPMD partitioning of
    the global sort would replicate that loop on every device. None on a one-device mesh too:
    there the exchange moves nothing and the shard_map only adds copies (measured 1.04x the
    plain step's time on an H200)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) or math.prod(mesh.shape.values()) == 1:
        return None
    token_split = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if num_experts % mesh.shape[EXPERT_AXIS] or num_tokens % token_split:
        return None
    return mesh


def _splits(mesh, axis: str, size: int) -> bool:
    return mesh.shape.get(axis, 1) > 1 and size % mesh.shape[axis] == 0


def _exchange_plan(expert_ids: jax.Array, keep: jax.Array, experts_per_device: int, num_devices: int,
                   rows_per_device: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where each of the n * k slots goes: (place [n*k]: row in the flat [X * B] send buffer, or
    X * B when not sent), the slot filling each send row (n * k = empty), and each send row's
    local expert id (E_l = padding)."""
    n_slots = expert_ids.size
    flat = jnp.where(keep.reshape(-1), expert_ids.reshape(-1), experts_per_device * num_devices)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted position -> slot
    sorted_ids = flat[order]
    dest = sorted_ids // experts_per_device  # X for dropped slots
    counts = jnp.bincount(dest, length=num_devices)  # dropped slots fall outside and are not counted
    starts = jnp.cumsum(counts) - counts
    rank = jnp.arange(n_slots) - jnp.take(starts, dest, mode="clip")
    sent = (dest < num_devices) & (rank < rows_per_device)
    buffer_rows = num_devices * rows_per_device
    row = jnp.where(sent, dest * rows_per_device + rank, buffer_rows)
    place = jnp.zeros((n_slots,), jnp.int32).at[order].set(row.astype(jnp.int32), unique_indices=True)
    slot_of_row = jnp.full((buffer_rows,), n_slots, jnp.int32).at[row].set(order, mode="drop")
    local_id = jnp.full((buffer_rows,), experts_per_device, jnp.int32).at[row].set(
        (sorted_ids % experts_per_device).astype(jnp.int32), mode="drop")
    return place, slot_of_row, local_id


def _local_experts(x, expert_ids, weights, keep, w_gate, w_up, w_down, *, grouped: SlotSwiGLU,
                   rows_per_device: int, split_hidden: bool, split_embed: bool):
    """The shard_map body: one device's tokens out to the expert owners and back."""
    n, k = expert_ids.shape
    num_devices = jax.lax.axis_size(EXPERT_AXIS)
    experts_per_device = w_gate.shape[0]
    place, slot_of_row, local_id = _exchange_plan(expert_ids, keep, experts_per_device, num_devices,
                                                  rows_per_device)
    token_of_row = jnp.where(slot_of_row < n * k, slot_of_row // k, n)  # empty rows read zeros
    send = take_rows(x, token_of_row)
    exchange = lambda a: jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)
    recv, recv_ids = exchange(send), exchange(local_id)
    if split_embed:  # FSDP: gather this layer's expert weights; the transpose reduce-scatters the
        # layer's gradients, so the stacked gradients leave split over fsdp
        w_gate, w_up = (jax.lax.all_gather(w, FSDP_AXIS, axis=1, tiled=True) for w in (w_gate, w_up))
        w_down = jax.lax.all_gather(w_down, FSDP_AXIS, axis=2, tiled=True)
    out = grouped(recv, recv_ids[:, None], w_gate, w_up, w_down)[:, 0]
    if split_hidden:  # each tensor shard computed a slice of the hidden units: sum the partials
        out = jax.lax.psum(out, TENSOR_AXIS)
    back = exchange(out)
    per_slot = take_rows(back, place).reshape(n, k, -1)  # dropped slots read zeros
    return combine_slots(per_slot, weights).astype(x.dtype)


def expert_parallel_swiglu(mesh, x: jax.Array, expert_ids: jax.Array, weights: jax.Array, keep: jax.Array,
                           experts, *, grouped: SlotSwiGLU, max_rows_per_expert: int | None = None) -> jax.Array:
    """y [N, D] = sum over kept slots of weight * expert(x), experts sharded over `expert`.

    x [N, D], expert_ids / weights / keep [N, k] are split over the batch axes; the expert weights
    enter split over `expert` (and their hidden dim over `tensor` when it divides) and are
    gathered over `fsdp` inside, one layer at a time, as FSDP does. grouped: the grouped SwiGLU
    each device runs over its receive buffer, a worst-case-sized buffer whose unused rows carry
    the id E_l (`GroupedSwiGLU.buffer`). max_rows_per_expert: a bound on the slots any one
    expert receives in total (the capacity), which sizes the send buffer; None = dropless worst case.
    """
    n_local = x.shape[0] // math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
    k = expert_ids.shape[1]
    experts_per_device = experts.w_gate.shape[0] // mesh.shape[EXPERT_AXIS]
    rows = n_local * k
    if max_rows_per_expert is not None:
        rows = min(rows, experts_per_device * max_rows_per_expert)
    # The weights enter laid out as the logical axis rules store them (expert, embed -> fsdp,
    # mlp -> tensor, each only when it divides), so nothing is resharded on the way in.
    split_hidden = _splits(mesh, TENSOR_AXIS, experts.w_gate.shape[-1])
    split_embed = _splits(mesh, FSDP_AXIS, experts.w_gate.shape[1])
    hidden = TENSOR_AXIS if split_hidden else None
    embed = FSDP_AXIS if split_embed else None
    tokens = P(BATCH_AXES)
    body: Callable = lambda *a: _local_experts(*a, grouped=grouped, rows_per_device=rows,
                                               split_hidden=split_hidden, split_embed=split_embed)
    run = jax.shard_map(
        body, mesh=mesh,
        in_specs=(tokens, tokens, tokens, tokens, P(EXPERT_AXIS, embed, hidden), P(EXPERT_AXIS, embed, hidden),
                  P(EXPERT_AXIS, hidden, embed)),
        # Unchecked: the body's grouped matmul may be a Pallas kernel, which cannot trace under
        # varying-axes checking. The transpose then sums each input's gradient over the mesh axes
        # its spec leaves out (weight gradients over token shards), which the tests compare
        # against the single-device dispatcher on fsdp x tensor x expert meshes.
        out_specs=tokens, check_vma=False)
    return run(x, expert_ids, weights, keep, experts.w_gate, experts.w_up, experts.w_down)
