"""Meshes over the first devices of the 8 host CPU devices (conftest), by axis sizes; axes not
named are 1. Shared by the sharding, expert-parallel and memory tests."""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from mixtral_jax.parallel.mesh import MESH_AXES


def mesh_of(sizes: dict[str, int]) -> Mesh:
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    return Mesh(np.asarray(jax.devices()[: int(np.prod(shape))]).reshape(shape), MESH_AXES)


@contextlib.contextmanager
def one_device_trainers_with_compile_cache(cache_dir: str) -> Iterator[None]:
    """In-process Trainers on a one-device mesh, with XLA's persistent compilation cache in
    cache_dir, so the many short runs of a test module compile each program once."""
    from jax._src import compilation_cache  # no public way to switch the cache on after start-up

    from mixtral_jax.training import trainer as trainer_module

    options = {"jax_compilation_cache_dir": cache_dir,
               "jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": 0}
    previous = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(trainer_module, "make_mesh", lambda cfg: mesh_of({"data": 1}))
            yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
