"""Device mesh from config: axes (data, fsdp, expert, tensor), `-1` fills the remaining devices."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixtral_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Batch rows are split over every axis that does not split the model's own dimensions.
BATCH_AXES = ("data", "fsdp", "expert")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    """Resolve `-1` and check the product against the devices found."""
    sizes = {axis: getattr(cfg, axis) for axis in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for axis, value in sizes.items():
        if value == -1:
            if num_devices % fixed:
                raise ConfigError(
                    f"config key 'mesh.{axis}': cannot fill -1: {num_devices} devices are not divisible by "
                    f"the other axes' product {fixed}")
            sizes[axis] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        shape = " x ".join(f"{a}={v}" for a, v in sizes.items())
        raise ConfigError(
            f"config key 'mesh': {shape} needs {math.prod(sizes.values())} devices but {num_devices} were found "
            f"({jax.devices()[0].platform}); set one axis to -1 to fill the devices")
    return sizes


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_shape(cfg, len(devices))
    grid = np.asarray(devices).reshape(tuple(sizes[a] for a in MESH_AXES))
    return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-like axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
