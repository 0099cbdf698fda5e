"""Meshes over the first devices of the 8 host CPU devices (conftest), by axis sizes; axes not
named are 1. Shared by the sharding, expert-parallel and memory tests."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from mixtral_jax.parallel.mesh import MESH_AXES


def mesh_of(sizes: dict[str, int]) -> Mesh:
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return Mesh(np.asarray(jax.devices()[: int(np.prod(shape))]).reshape(shape), MESH_AXES)
