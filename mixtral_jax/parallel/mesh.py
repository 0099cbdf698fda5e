"""Device mesh from config: axes (data, fsdp, expert, tensor), `-1` fills the remaining devices,
`dcn_*` multiplies an axis across slices (hybrid ICI x DCN meshes); multi-process (multi-host)
start-up from the launcher's environment."""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mixtral_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Batch rows are split over every axis that does not split the model's own dimensions.
BATCH_AXES = ("data", "fsdp", "expert")


def _describe_devices(devices: Sequence[jax.Device] | None) -> str:
    devices = list(devices if devices is not None else jax.devices())
    shown = ", ".join(str(d) for d in devices[:16])
    more = f", ... ({len(devices) - 16} more)" if len(devices) > 16 else ""
    return f"{shown}{more} in {jax.process_count()} process(es)"


def dcn_shape(cfg: MeshConfig) -> dict[str, int]:
    return {axis: getattr(cfg, f"dcn_{axis}") for axis in MESH_AXES}


def mesh_shape(cfg: MeshConfig, num_devices: int, devices: Sequence[jax.Device] | None = None) -> dict[str, int]:
    """Total size of each axis (within-slice size x slices along it), `-1` resolved against
    the devices of one slice, checked against the devices found."""
    dcn = dcn_shape(cfg)
    slices = math.prod(dcn.values())
    if num_devices % slices:
        raise ConfigError(f"config key 'mesh': dcn_* axes ask for {slices} slices but {num_devices} devices "
                          f"({_describe_devices(devices)}) do not split into {slices} equal slices")
    per_slice = num_devices // slices
    sizes = {axis: getattr(cfg, axis) for axis in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    for axis, value in sizes.items():
        if value == -1:
            if per_slice % fixed:
                raise ConfigError(
                    f"config key 'mesh.{axis}': cannot fill -1: {per_slice} devices per slice are not divisible "
                    f"by the other axes' product {fixed}")
            sizes[axis] = per_slice // fixed
    if math.prod(sizes.values()) != per_slice:
        shape = " x ".join(f"{a}={v}" for a, v in sizes.items())
        where = f" per slice ({slices} slices)" if slices > 1 else ""
        raise ConfigError(
            f"config key 'mesh': {shape} needs {math.prod(sizes.values())} devices{where} but "
            f"{per_slice if slices > 1 else num_devices} were found ({_describe_devices(devices)}); "
            "set one axis to -1 to fill the devices")
    return {axis: sizes[axis] * dcn[axis] for axis in MESH_AXES}


def device_grid(cfg: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
    """Devices arranged [data, fsdp, expert, tensor]. With dcn_* axes, a hybrid mesh: each slice
    (TPU `slice_index`; each process where slices do not match, as on GPU nodes) is one block, so only the dcn part of an axis crosses
    the slow network and everything else stays on ICI / NVLink."""
    devices = list(devices)
    total = mesh_shape(cfg, len(devices), devices)
    dcn = dcn_shape(cfg)
    if math.prod(dcn.values()) == 1:
        return np.asarray(devices).reshape(tuple(total[a] for a in MESH_AXES))
    ici = tuple(total[a] // dcn[a] for a in MESH_AXES)
    wanted = math.prod(dcn.values())
    slices = {getattr(d, "slice_index", None) for d in devices}
    processes = {d.process_index for d in devices}
    if len(slices) != wanted and len(processes) != wanted:
        raise ConfigError(f"config key 'mesh': the dcn_* axes ask for {wanted} slices but the devices span "
                          f"{len(slices)} slice(s) and {len(processes)} process(es)")
    try:
        return mesh_utils.create_hybrid_device_mesh(ici, tuple(dcn[a] for a in MESH_AXES), devices,
                                                    process_is_granule=len(slices) != wanted)
    except ValueError as err:
        raise ConfigError(f"config key 'mesh': cannot lay the slices out as asked: {err}") from None


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    return Mesh(device_grid(cfg, devices if devices is not None else jax.devices()), MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data-like axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def traced_under(mesh: Mesh, fn: Callable) -> Callable:
    """fn, tracing its body with `mesh` as the abstract mesh in context, so the model can ask for
    it (`jax.sharding.get_abstract_mesh()`): the MoE dispatchers switch to expert parallelism and
    `rules.constrain` pins activation layouts. Outside such a trace both are no-ops."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def initialize_distributed() -> bool:
    """Join a multi-process JAX job when the launcher says there is one; call before any JAX
    computation. Returns True when it initialised (then jax.devices() spans every process).

    Recognised: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (explicit; also
    JAX_LOCAL_DEVICE_IDS), SLURM (srun with more than one task), Open MPI (mpirun -n > 1) and
    multi-host Cloud TPU slices; JAX's own cluster detection fills in the details for the last three.
    """
    env = os.environ
    explicit = "JAX_COORDINATOR_ADDRESS" in env
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in env
    mpi = int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    tpu_pod = "," in env.get("TPU_WORKER_HOSTNAMES", "")
    if not (explicit or slurm or mpi or tpu_pod) or jax.distributed.is_initialized():
        return False
    # Cross-process collectives between CPU devices need a transport; gloo (TCP) ships with
    # jaxlib. It only affects the CPU backend, so it is harmless on GPU / TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if explicit and "JAX_NUM_PROCESSES" in env:
        kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                  "num_processes": int(env["JAX_NUM_PROCESSES"]), "process_id": int(env["JAX_PROCESS_ID"])}
    jax.distributed.initialize(**kwargs)
    return True
