"""Ahead-of-time lowering of the real training step from abstract shapes: nothing is allocated,
so a config can be compiled for a mesh to read XLA's own memory analysis before any run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mixtral_jax.config import Config
from mixtral_jax.parallel.mesh import batch_sharding
from mixtral_jax.training.trainer import Program, build_program

BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
                "loss_mask": jnp.float32}


def abstract_train_inputs(cfg: Config, mesh: Mesh, program: Program) -> tuple:
    """(state, batch) as ShapeDtypeStructs carrying the shardings the train step is jitted with."""
    state = program.sharded_shapes()
    shape, sharding = (cfg.data.batch_size, cfg.data.seq_len), batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(shape, dt, sharding=sharding) for k, dt in BATCH_DTYPES.items()}
    return state, batch


def compile_train_step(cfg: Config, mesh: Mesh) -> jax.stages.Compiled:
    """The train step exactly as the Trainer runs it, compiled for `mesh` from shapes alone."""
    program = build_program(cfg, mesh)
    return program.train_step.lower(*abstract_train_inputs(cfg, mesh, program)).compile()
