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
`capacity`, whose global per-expert capacity C bounds what any expert receives.

Steps 1, 2 and 4 are the exchange, one of two strategies (`EXCHANGES`), chosen per backend
once (`Kernels.exchange`, kernels/backend.py):
- `padded` (CPU): the [X, B, D] buffers above through `all_to_all`: X * B rows sent and returned
  per device whatever the routing, X times a balanced exchange's rows for dropless.
- `ragged` (GPU, TPU): the n * k slots sorted by destination, sent with `ragged_all_to_all`
  (only routed rows cross the wire; the send and return buffers are n * k rows), after one
  all_gather of the [X, X] send-size matrix from which every device computes its offsets
  (`ragged_offsets`). The receive buffer keeps the worst case: X * n * k rows for dropless,
  E_l * C for capacity. XLA:CPU does not implement `ragged_all_to_all`, so the tests run this
  strategy with the collective emulated by all_to_all, and check the offsets against a loop.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

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


Compute = Callable[[jax.Array, jax.Array], jax.Array]  # (rows [R, D], local ids [R]) -> outputs [R, D]


def _all_to_all(a: jax.Array) -> jax.Array:
    return jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)


def padded_exchange(x: jax.Array, expert_ids: jax.Array, keep: jax.Array, experts_per_device: int,
                    rows_per_device: int, receive_rows: int, compute: Compute) -> jax.Array:
    """Each kept slot's expert output [n * k, D] (dropped slots: zeros), through [X, B, D] buffers."""
    n, k = expert_ids.shape
    place, slot_of_row, local_id = _exchange_plan(expert_ids, keep, experts_per_device,
                                                  jax.lax.axis_size(EXPERT_AXIS), rows_per_device)
    token_of_row = jnp.where(slot_of_row < n * k, slot_of_row // k, n)  # empty rows read zeros
    recv, recv_ids = _all_to_all(take_rows(x, token_of_row)), _all_to_all(local_id)
    return take_rows(_all_to_all(compute(recv, recv_ids)), place)


class RaggedPlan(NamedTuple):
    """One device's side of a ragged exchange. place [n*k]: each slot's row in the send (and
    return) buffer, n*k when not sent; token_of_row [n*k]: the token each send row reads (n =
    none); local_id [n*k]: each send row's local expert (E_l = none); send_sizes [X]: rows per
    destination, the send rows sorted by destination."""

    place: jax.Array
    token_of_row: jax.Array
    local_id: jax.Array
    send_sizes: jax.Array


def ragged_plan(expert_ids: jax.Array, keep: jax.Array, experts_per_device: int, num_devices: int) -> RaggedPlan:
    """Sort the kept slots by global expert (so by destination, then local expert); the rest last."""
    n, k = expert_ids.shape
    flat = jnp.where(keep.reshape(-1), expert_ids.reshape(-1), experts_per_device * num_devices)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # send row -> slot
    sorted_ids = flat[order]
    sent = sorted_ids < experts_per_device * num_devices
    rows = jnp.arange(n * k, dtype=jnp.int32)
    place = jnp.zeros((n * k,), jnp.int32).at[order].set(jnp.where(sent, rows, n * k), unique_indices=True)
    return RaggedPlan(place, jnp.where(sent, order // k, n).astype(jnp.int32),
                      jnp.where(sent, sorted_ids % experts_per_device, experts_per_device).astype(jnp.int32),
                      jnp.bincount(sorted_ids // experts_per_device, length=num_devices).astype(jnp.int32))


class RaggedOffsets(NamedTuple):
    """ragged_all_to_all's arguments for device `me` (each [X], indexed by the peer), going out
    (send_offsets, sizes[me], output_offsets, recv_sizes) and back (recv_offsets, recv_sizes,
    back_offsets, sizes[me])."""

    send_offsets: jax.Array  # where my rows for peer j start in my send buffer
    output_offsets: jax.Array  # where my rows for peer j land in j's receive buffer
    recv_sizes: jax.Array  # rows I receive from peer i
    recv_offsets: jax.Array  # where peer i's rows start in my receive buffer
    back_offsets: jax.Array  # where my results for peer i land in i's return buffer (its send rows)


def ragged_offsets(sizes: jax.Array, me: jax.Array) -> RaggedOffsets:
    """sizes [X, X]: sizes[i, j] rows device i sends device j. Receive buffers are filled in
    source order, send buffers in destination order."""
    exclusive_down = jnp.cumsum(sizes, axis=0) - sizes  # [i, j]: rows j gets from devices before i
    exclusive_right = jnp.cumsum(sizes, axis=1) - sizes  # [i, j]: rows i sends devices before j
    return RaggedOffsets(send_offsets=exclusive_right[me], output_offsets=exclusive_down[me],
                         recv_sizes=sizes[:, me], recv_offsets=exclusive_down[:, me],
                         back_offsets=exclusive_right[:, me])


RaggedAllToAll = Callable[..., jax.Array]  # jax.lax.ragged_all_to_all's signature


@dataclass(frozen=True)
class RaggedExchange:
    """The exchange through `collective` (jax.lax.ragged_all_to_all; tests pass an emulation)."""

    collective: RaggedAllToAll = jax.lax.ragged_all_to_all

    def __call__(self, x: jax.Array, expert_ids: jax.Array, keep: jax.Array, experts_per_device: int,
                 rows_per_device: int, receive_rows: int, compute: Compute) -> jax.Array:
        n, k = expert_ids.shape
        plan = ragged_plan(expert_ids, keep, experts_per_device, jax.lax.axis_size(EXPERT_AXIS))
        sizes = jax.lax.all_gather(plan.send_sizes, EXPERT_AXIS)  # [X, X]
        off = ragged_offsets(sizes, jax.lax.axis_index(EXPERT_AXIS))
        send = take_rows(x, plan.token_of_row)
        out = functools.partial(self.collective, axis_name=EXPERT_AXIS)
        recv = out(send, jnp.zeros((receive_rows, x.shape[1]), x.dtype), off.send_offsets, plan.send_sizes,
                   off.output_offsets, off.recv_sizes)
        recv_ids = out(plan.local_id, jnp.full((receive_rows,), experts_per_device, jnp.int32), off.send_offsets,
                       plan.send_sizes, off.output_offsets, off.recv_sizes)
        result = compute(recv, recv_ids)
        back = out(result, jnp.zeros((n * k, result.shape[1]), result.dtype), off.recv_offsets, off.recv_sizes,
                   off.back_offsets, plan.send_sizes)
        return take_rows(back, plan.place)


Exchange = Callable[..., jax.Array]  # padded_exchange's signature
EXCHANGES: dict[str, Exchange] = {"padded": padded_exchange, "ragged": RaggedExchange()}


def exchange_rows(strategy: str, n_slots: int, num_devices: int, rows_per_device: int,
                  receive_rows: int) -> dict[str, int]:
    """Rows of each per-layer exchange buffer on one device (times dim x dtype bytes for the size):
    send, receive (both of the computation's input and output) and return."""
    if strategy == "padded":
        return {"send": num_devices * rows_per_device, "receive": num_devices * rows_per_device,
                "return": num_devices * rows_per_device}
    return {"send": n_slots, "receive": receive_rows, "return": n_slots}


def exchange_bytes(tokens_per_device: int, top_k: int, num_experts: int, expert_devices: int, dim: int,
                   itemsize: int, capacity: int | None = None) -> dict[str, dict[str, int]]:
    """Per strategy, the bytes of one MoE layer's exchange buffers on one device (`exchange_rows`
    times dim x itemsize), sized as `expert_parallel_swiglu` sizes them; capacity: the capacity
    dispatcher's slots per expert (None = dropless). For the `compile` verb's report: a CPU
    compile has only the padded exchange to measure."""
    slots = tokens_per_device * top_k
    per_device = num_experts // expert_devices
    rows, receive = slots, expert_devices * slots
    if capacity is not None:
        rows, receive = min(rows, per_device * capacity), min(receive, per_device * capacity)
    return {name: {part: count * dim * itemsize
                   for part, count in exchange_rows(name, slots, expert_devices, rows, receive).items()}
            for name in EXCHANGES}


def _local_experts(x, expert_ids, weights, keep, w_gate, w_up, w_down, *, grouped: SlotSwiGLU, exchange: Exchange,
                   rows_per_device: int, receive_rows: int, split_hidden: bool, split_embed: bool):
    """The shard_map body: one device's tokens out to the expert owners and back."""
    n, k = expert_ids.shape
    if split_embed:  # FSDP: gather this layer's expert weights; the transpose reduce-scatters the
        # layer's gradients, so the stacked gradients leave split over fsdp
        w_gate, w_up = (jax.lax.all_gather(w, FSDP_AXIS, axis=1, tiled=True) for w in (w_gate, w_up))
        w_down = jax.lax.all_gather(w_down, FSDP_AXIS, axis=2, tiled=True)

    def compute(recv, recv_ids):
        out = grouped(recv, recv_ids[:, None], w_gate, w_up, w_down)[:, 0]
        if split_hidden:  # each tensor shard computed a slice of the hidden units: sum the partials
            out = jax.lax.psum(out, TENSOR_AXIS)
        return out

    per_slot = exchange(x, expert_ids, keep, w_gate.shape[0], rows_per_device, receive_rows, compute)
    return combine_slots(per_slot.reshape(n, k, -1), weights).astype(x.dtype)  # dropped slots read zeros


def expert_parallel_swiglu(mesh, x: jax.Array, expert_ids: jax.Array, weights: jax.Array, keep: jax.Array,
                           experts, *, grouped: SlotSwiGLU, max_rows_per_expert: int | None = None,
                           exchange: Exchange = padded_exchange) -> jax.Array:
    """y [N, D] = sum over kept slots of weight * expert(x), experts sharded over `expert`.

    x [N, D], expert_ids / weights / keep [N, k] are split over the batch axes; the expert weights
    enter split over `expert` (and their hidden dim over `tensor` when it divides) and are
    gathered over `fsdp` inside, one layer at a time, as FSDP does. grouped: the grouped SwiGLU
    each device runs over its receive buffer, a worst-case-sized buffer whose unused rows carry
    the id E_l (`GroupedSwiGLU.buffer`). max_rows_per_expert: a bound on the slots any one
    expert receives in total (the capacity), which sizes the buffers; None = dropless worst case.
    exchange: one of EXCHANGES.
    """
    n_local = x.shape[0] // math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES)
    k = expert_ids.shape[1]
    experts_per_device = experts.w_gate.shape[0] // mesh.shape[EXPERT_AXIS]
    rows = receive = n_local * k
    receive *= mesh.shape[EXPERT_AXIS]
    if max_rows_per_expert is not None:
        rows = min(rows, experts_per_device * max_rows_per_expert)
        receive = min(receive, experts_per_device * max_rows_per_expert)
    # The weights enter laid out as the logical axis rules store them (expert, embed -> fsdp,
    # mlp -> tensor, each only when it divides), so nothing is resharded on the way in.
    split_hidden = _splits(mesh, TENSOR_AXIS, experts.w_gate.shape[-1])
    split_embed = _splits(mesh, FSDP_AXIS, experts.w_gate.shape[1])
    hidden = TENSOR_AXIS if split_hidden else None
    embed = FSDP_AXIS if split_embed else None
    tokens = P(BATCH_AXES)
    body: Callable = lambda *a: _local_experts(*a, grouped=grouped, exchange=exchange, rows_per_device=rows,
                                               receive_rows=receive, split_hidden=split_hidden,
                                               split_embed=split_embed)
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
