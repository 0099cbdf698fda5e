"""Ahead-of-time lowering of the real training step from abstract shapes: nothing is allocated,
so a config can be compiled for a mesh to read XLA's own memory analysis before any run."""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from mixtral_jax.config import Config, ConfigError
from mixtral_jax.kernels.backend import Kernels
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.parallel.mesh import MESH_AXES, batch_sharding
from mixtral_jax.training.program import Program, build_program

BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
                "loss_mask": jnp.float32}


def abstract_train_inputs(cfg: Config, mesh: Mesh, program: Program) -> tuple:
    """(state, batch) as ShapeDtypeStructs carrying the shardings the train step is jitted with."""
    state = program.sharded_shapes()
    shape, sharding = (cfg.data.batch_size, cfg.data.seq_len), batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding) for k, dt in BATCH_DTYPES.items()}
    return state, batch


def compile_train_step(cfg: Config, mesh: Mesh) -> jax.stages.Compiled:
    """The train step as the Trainer runs it on the target's accelerators, compiled for `mesh`
    from shapes alone: the host CPU's kernels, with the layers as the loop `model.scan_unroll:
    auto` gives on GPUs and TPUs (the CPU unrolls shallow models, which changes what XLA keeps)."""
    loop = Kernels.for_backend().replace(max_unrolled_layers=0)
    program = build_program(cfg, mesh, functools.partial(Transformer, kernels=loop))
    return program.train_step.lower(*abstract_train_inputs(cfg, mesh, program)).compile()


def compile_report(cfg: Config, sizes: dict[str, int]) -> dict:
    """Compile the train step for a mesh of `sizes` on host devices and return XLA's per-device
    memory analysis beside the planner's estimate (bytes) and the compile time (s)."""
    from mixtral_jax.training.memory import plan_memory

    needed = math.prod(sizes.values())
    devices = jax.devices()
    if len(devices) < needed:
        raise ConfigError(f"--mesh needs {needed} devices but JAX has {len(devices)} "
                          f"({devices[0].platform}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count"
                          f"={needed} or run this verb in a fresh process")
    for axis, value in sizes.items():
        setattr(cfg.mesh, axis, value)
    mesh = Mesh(np.asarray(devices[:needed]).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)
    start = time.perf_counter()
    compiled = compile_train_step(cfg, mesh)
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    # Donated state: outputs alias the arguments, so the live peak is arguments + temps + the
    # outputs that are not aliases (the metrics).
    xla = {"arguments": stats.argument_size_in_bytes, "temp": stats.temp_size_in_bytes,
           "outputs_not_aliased": stats.output_size_in_bytes - stats.alias_size_in_bytes,
           "generated_code": stats.generated_code_size_in_bytes}
    xla["total"] = sum(xla.values())
    return {"mesh": dict(sizes), "platform": devices[0].platform, "compile_s": seconds, "xla": xla,
            "planner_total": plan_memory(cfg, sizes).total, "exchange": _exchange_buffers(cfg, mesh)}


def _exchange_buffers(cfg: Config, mesh: Mesh) -> dict[str, dict[str, int]] | None:
    """Per exchange strategy, one MoE layer's exchange buffers per device (bytes), for an
    expert-parallel mesh: a CPU compile runs only the padded exchange, so the ragged one (what a
    GPU or TPU runs) is reported from the same sizing arithmetic."""
    from mixtral_jax.models.routing import capacity_size
    from mixtral_jax.parallel.expert_parallel import exchange_bytes
    from mixtral_jax.parallel.mesh import batch_divisor

    moe = cfg.model.moe
    if not cfg.model.is_moe or mesh.shape["expert"] == 1:
        return None
    tokens = cfg.data.batch_size * cfg.data.seq_len
    capacity = (capacity_size(tokens, moe.top_k, moe.num_experts, moe.capacity_factor)
                if moe.dispatch == "capacity" else None)
    return exchange_bytes(tokens // batch_divisor(mesh), moe.top_k, moe.num_experts, mesh.shape["expert"],
                          cfg.model.dim, jnp.dtype(cfg.model.dtype).itemsize, capacity)


def _binary(count: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (these buffers span KiB to TiB)."""
    for unit, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count} B"


def format_compile_report(report: dict, device: str | None) -> str:
    from mixtral_jax.training.memory import GIB, device_memory_gib, usable_bytes

    shape = " x ".join(f"{a}={v}" for a, v in report["mesh"].items() if v > 1) or "one device"
    xla = report["xla"]
    lines = [f"compiled the train step for mesh {shape} on {report['platform']} host devices in "
             f"{report['compile_s']:.1f} s; XLA memory analysis per device:",
             f"  {'arguments (params, optimizer, batch)':<38}{xla['arguments'] / GIB:>10.2f} GiB",
             f"  {'temporaries (activations, gradients)':<38}{xla['temp'] / GIB:>10.2f} GiB",
             f"  {'outputs not aliased to arguments':<38}{xla['outputs_not_aliased'] / GIB:>10.2f} GiB",
             f"  {'total':<38}{xla['total'] / GIB:>10.2f} GiB",
             f"  planner estimate (mixtral-jax params --mesh): {report['planner_total'] / GIB:.2f} GiB "
             f"({report['planner_total'] / max(xla['total'], 1):.2f}x XLA's)"]
    for name, parts in (report.get("exchange") or {}).items():
        sizes = ", ".join(f"{part} {_binary(count)}" for part, count in parts.items())
        lines.append(f"  expert exchange buffers per MoE layer, {name} "
                     f"({'compiled here' if name == 'padded' else 'GPU/TPU'}): {sizes}")
    if device:
        cap = usable_bytes(device)
        verdict = "fits" if xla["total"] <= cap else "does NOT fit"
        lines.append(f"  {verdict} {device} ({device_memory_gib(device):g} GiB, {cap / GIB:.1f} GiB usable: "
                     f"{xla['total'] / cap:.0%} used)")
    lines.append("  (the CPU compiler's buffer assignment; a GPU / TPU compile of the same program differs "
                 "somewhat, mostly in temporaries)")
    return "\n".join(lines)
