"""Grouped matmul as Pallas (Triton) kernels, for the dropless path on NVIDIA GPUs.

    grouped_matmul(x [M, K], w [E, K, N], layout) -> [M, N], rows of block i times w[layout.block_expert[i]]

The rows come in the layout `rows.padded_rows` builds (the CPU runs use it with
half-blocks): sorted by expert, each expert's rows padded to whole blocks of `bm` rows, so
every block belongs to one expert.
XLA's GPU `ragged_dot` expands into one dense matmul per expert (measured 7.7x a dense layer of
equal FLOPs on an H100); a kernel that reads each block's expert from a table does the grouped
product at matmul cost. Two kernels, three calls per matmul:
- `_gmm`:  out[block i] = x[block i] @ w[e_i]          (forward; w transposed: the input gradient)
- `_tgmm`: dw[e] = sum over e's blocks of x[b]^T @ dy[b] (weight gradient; a loop over the
  expert's own blocks, so its cost is the expert's rows, not all rows)
Blocks past the used ones carry expert -1 and give zero rows. Tiles must divide K and N
(`supported` says when they do); `interpret=True` runs the same kernels on a CPU (the tests).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

SAVE_NAME = "grouped_matmul"  # checkpoint_name of the kernel outputs (see models/transformer.py)
TILES = (256, 128, 64, 32, 16)  # Triton wants power-of-two tiles of at least 16 for its dot


class KernelConfig(NamedTuple):
    """Largest output-column tile and depth tile to try (smaller ones when they do not divide),
    and Triton's warps per program and pipeline stages. The default keeps the [bm, bk] and
    [bk, bn] bf16 inputs of 3 stages within 96 KiB of shared memory."""

    bn: int = 128
    bk: int = 64
    num_warps: int = 4
    num_stages: int = 3


DEFAULT = KernelConfig()


class BlockLayout(NamedTuple):
    """block_expert [num_blocks] int32 (-1: unused block), block_bounds [E + 1] int32 (expert e
    owns blocks block_bounds[e] .. block_bounds[e + 1] - 1), rows per block."""

    block_expert: jax.Array
    block_bounds: jax.Array
    bm: int


def tile_for(size: int, largest: int = 128) -> int | None:
    return next((t for t in TILES if t <= largest and size % t == 0), None)


def supported(dim: int, hidden: int, dtype: jnp.dtype) -> bool:
    """Whether the kernels take these sizes: 16-bit inputs (float32 would run Triton's TF32 or
    its slow full-precision dot) and tiles that divide both matmul widths."""
    return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and tile_for(dim) is not None and \
        tile_for(hidden) is not None


def _out_struct(shape: tuple[int, ...], dtype: jnp.dtype, *like: jax.Array) -> jax.ShapeDtypeStruct:
    """The kernel's output type, varying over the same manual mesh axes as its inputs: under a
    checked `shard_map` pallas_call must be told, or it refuses to trace. (The expert-parallel
    shard_map is unchecked, because Pallas' interpret mode fails those checks.)"""
    mats = [getattr(jax.typeof(a), "manual_axis_type", None) for a in like]
    mat = max(mats, key=lambda m: len(getattr(m, "varying", ())))  # the widest: outputs vary where any input does
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def _params(config: KernelConfig) -> plt.CompilerParams:
    return plt.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _gmm_kernel(expert_ref, x_ref, w_ref, o_ref, *, bm: int, bn: int, bk: int, transpose_w: bool):
    i, j = pl.program_id(0), pl.program_id(1)
    e = expert_ref[i]
    rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)
    depth = x_ref.shape[1]

    @pl.when(e < 0)
    def _():
        o_ref[rows, cols] = jnp.zeros((bm, bn), o_ref.dtype)

    @pl.when(e >= 0)
    def _():
        def body(kk, acc):
            a = x_ref[rows, pl.ds(kk * bk, bk)]
            if transpose_w:  # w [E, N, K] read as its [bn, bk] tile, used transposed
                return acc + plt.dot(a, w_ref[e, cols, pl.ds(kk * bk, bk)], trans_b=True)
            return acc + plt.dot(a, w_ref[e, pl.ds(kk * bk, bk), cols])

        acc = jax.lax.fori_loop(0, depth // bk, body, jnp.zeros((bm, bn), jnp.float32))
        o_ref[rows, cols] = acc.astype(o_ref.dtype)


def _gmm(x: jax.Array, w: jax.Array, layout: BlockLayout, transpose_w: bool, config: KernelConfig,
         interpret: bool) -> jax.Array:
    """x [M, K] @ w[e] per block -> [M, N]; with transpose_w, w is [E, N, K] and is used as w[e]^T."""
    m, depth = x.shape
    n = w.shape[1] if transpose_w else w.shape[2]
    bn, bk = tile_for(n, config.bn), tile_for(depth, config.bk)
    kernel = functools.partial(_gmm_kernel, bm=layout.bm, bn=bn, bk=bk, transpose_w=transpose_w)
    return pl.pallas_call(kernel, out_shape=_out_struct((m, n), x.dtype, x, w), grid=(m // layout.bm, n // bn),
                          compiler_params=_params(config), interpret=interpret, name="grouped_matmul")(
        layout.block_expert, x, w)


def _tgmm_kernel(bounds_ref, x_ref, dy_ref, o_ref, *, bm: int, bk: int, bn: int):
    e, kb, nb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ks, ns = pl.ds(kb * bk, bk), pl.ds(nb * bn, bn)

    def body(block, acc):
        rows = pl.ds(block * bm, bm)
        return acc + plt.dot(x_ref[rows, ks], dy_ref[rows, ns], trans_a=True)

    acc = jax.lax.fori_loop(bounds_ref[e], bounds_ref[e + 1], body, jnp.zeros((bk, bn), jnp.float32))
    o_ref[e, ks, ns] = acc.astype(o_ref.dtype)


def _tgmm(x: jax.Array, dy: jax.Array, layout: BlockLayout, out_dtype: jnp.dtype, config: KernelConfig,
          interpret: bool) -> jax.Array:
    """dw [E, K, N]: per expert, x^T @ dy over its own blocks (float32 accumulation)."""
    depth, n = x.shape[1], dy.shape[1]
    num_experts = layout.block_bounds.shape[0] - 1
    bk, bn = tile_for(depth, config.bk), tile_for(n, config.bn)
    kernel = functools.partial(_tgmm_kernel, bm=layout.bm, bk=bk, bn=bn)
    return pl.pallas_call(kernel, out_shape=_out_struct((num_experts, depth, n), out_dtype, x, dy),
                          grid=(num_experts, depth // bk, n // bn), compiler_params=_params(config),
                          interpret=interpret, name="grouped_matmul_weight_grad")(layout.block_bounds, x, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped_matmul(x, w, layout_arrays, bm, config, interpret):
    return _gmm(x, w, BlockLayout(*layout_arrays, bm), False, config, interpret)


def _grouped_matmul_fwd(x, w, layout_arrays, bm, config, interpret):
    return _grouped_matmul(x, w, layout_arrays, bm, config, interpret), (x, w, layout_arrays)


def _grouped_matmul_bwd(bm, config, interpret, res, dy):
    x, w, layout_arrays = res
    layout = BlockLayout(*layout_arrays, bm)
    dy = dy.astype(x.dtype)
    dx = _gmm(dy, w, layout, True, config, interpret)
    dw = _tgmm(x, dy, layout, w.dtype, config, interpret)
    return dx, dw, (None, None)


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, layout: BlockLayout, config: KernelConfig = DEFAULT,
                   interpret: bool = False) -> jax.Array:
    """Differentiable: the input gradient is a grouped matmul with w transposed, the weight
    gradient the per-expert `_tgmm`. w is cast to x's dtype (the compute dtype)."""
    out = _grouped_matmul(x, w.astype(x.dtype), (layout.block_expert, layout.block_bounds), layout.bm, config,
                          interpret)
    # Named so the dots_saveable remat policy keeps it, as it keeps a dense matmul's output: a
    # custom call is not a dot, and the kernel would otherwise run again in the backward pass.
    return checkpoint_name(out, SAVE_NAME)
