"""Logical axis rules: the one table mapping the model's logical axis names onto the mesh
axes (data, fsdp, expert, tensor), and the shardings it implies for a whole train state.

Parameters carry logical names as nnx `out_sharding` metadata (see models/layers.py
`make_param`). Optimizer moments are built by tree-mapping over the params, so they keep
the same Variable wrappers and metadata and therefore get the same shardings as the params.
Anything without names (step, rng, Adam's count, router biases) is replicated.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixtral_jax.parallel.mesh import BATCH_AXES

MeshAxes = str | tuple[str, ...] | None

# logical name -> mesh axis (or axes). Names not listed (and None) are replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", BATCH_AXES),  # activations outside the MoE: split over every data-like axis
    ("embed", "fsdp"),  # ZeRO-3 style: every weight matrix is split along its model dim
    ("vocab", "tensor"),
    ("q_heads", "tensor"),  # Megatron attention: heads split, head_dim whole
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),  # Megatron MLP: hidden split
    ("expert", "expert"),  # expert parallelism: each expert group lives on its devices
    ("head_dim", None),
    ("layers", None),  # the scanned layer stack is sliced per step, never split
)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES) -> P:
    """PartitionSpec for an array of `shape` whose dims are named `names`.

    A dim falls back to replication when its size is not divisible by the product of its
    mesh axes (tiny test models, odd head counts) or when a mesh axis was already used by an
    earlier dim (a mesh axis may split only one dim). Mesh axes of size 1 are dropped so the
    spec says what is really split.
    """
    table = dict(rules)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, size in zip(names, shape):
        axes = tuple(a for a in _as_tuple(table.get(name) if name is not None else None)
                     if a in mesh.shape and mesh.shape[a] > 1)
        split = math.prod(mesh.shape[a] for a in axes)
        if not axes or size % split or used.intersection(axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None],
              rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES) -> jax.Array:
    """Pin an activation's layout by its logical dim names when traced under a mesh
    (`mesh.traced_under`); a no-op otherwise. Keeps the partitioner from choosing, say, a
    replicated residual stream after a gather of FSDP-sharded weights."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def logical_names(var: nnx.Variable) -> tuple[str | None, ...] | None:
    meta = var.get_metadata()
    names = meta.get("out_sharding", meta.get("sharding_names"))  # the key was renamed in flax 0.12
    return tuple(names) if names is not None else None


def state_shardings(abstract: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings with the structure of `abstract` (e.g. from jax.eval_shape / nnx.eval_shape
    of the train state): named Variables by the rules, every other leaf replicated."""

    def one(node: Any) -> Any:
        if isinstance(node, nnx.Variable):
            if not hasattr(node.get_value(), "shape"):
                return node  # no array inside (optax's MaskedNode for a frozen weight's moments)
            names = logical_names(node)
            shape = node.get_value().shape
            spec = logical_to_spec(names, shape, mesh, rules) if names and len(names) == len(shape) else P()
            return node.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable))

