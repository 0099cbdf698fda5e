"""Which kernels a model runs, resolved once from the backend.

The model never asks `jax.default_backend()` itself: it is built with a `Kernels` (by default
`Kernels.for_backend()`) and calls `kernels.matmul`, `kernels.grouped` and reads
`kernels.segment_bounds`. A benchmark or test that wants another choice builds the model with
its own `Kernels` (e.g. `Kernels.for_backend().replace(matmul_custom_gradient=False)`), rather
than patching a module. The config's own choices (`model.grouped_kernel`, `model.fp8`) are
applied by `Kernels.with_choices`, once, where the model is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mixtral_jax.config.choices import GROUPED_KERNELS
from mixtral_jax.config.errors import ConfigError
from mixtral_jax.kernels import fp8, packed_attention
from mixtral_jax.kernels.grouped import (CPU, PALLAS, PALLAS_INTERPRETED, RAGGED, TOKAMAX, GroupedSwiGLU,
                                         import_tokamax)
from mixtral_jax.kernels.matmul import rows_matmul


# On XLA:CPU a scanned layer reads its weights through a dynamic slice of the stacked arrays,
# which copies them every step; unrolled layers slice statically. Unrolling costs compile time
# that grows with depth (`python -m benchmarks.compile_time --unrolled`, 2-core CPU, jax 0.10.2:
# the tiny MoE's step compiles in 6.5 s as a loop at any depth; unrolled 7.5 s at 4 layers, 11.1 s
# at 8, 19.2 s at 16, 40.9 s at 32; the tiny dense model 2.8 s as a loop, 3.7 s unrolled at 8).
# Up to 8 layers the unrolled compile stays under 2x the loop's, so auto unrolls there. Other
# backends keep the loop: their slices are not copies, and their models are deep.
CPU_MAX_UNROLLED_LAYERS = 8

# `model.grouped_kernel: auto`, per backend. GPU keeps our Pallas kernel: tokamax's kernels are
# the candidate to replace it, but no H100 row of `benchmarks/grouped_matmul.py` has measured
# them against it yet (docs/performance.md, "Kernel and exchange choices"). TPU: XLA's native
# ragged dot. CPU: the static runs (XLA:CPU's ragged_dot is a masked dense matmul, 9x).
AUTO_GROUPED = {"cpu": "cpu", "gpu": "pallas", "tpu": "ragged_dot"}
# The expert-parallel exchange (parallel/expert_parallel.py): `ragged_all_to_all` sends only the
# routed rows; XLA:CPU does not implement it ("not supported by XLA:CPU ThunkEmitter", jax
# 0.10.2), so CPU keeps the padded all_to_all.
EXCHANGE = {"cpu": "padded", "gpu": "ragged", "tpu": "ragged"}


def _unavailable(name: str, why: str) -> ConfigError:
    return ConfigError(f"config key 'model.grouped_kernel': {name} {why}")


def _tokamax(backend: str, interpret: bool) -> GroupedSwiGLU:
    try:
        import_tokamax()  # the gpu extra
    except ImportError as err:
        raise _unavailable("tokamax", f"does not import here ({err}); pip install 'mixtral_jax[gpu]'") from None
    return TOKAMAX


def _pallas(backend: str, interpret: bool) -> GroupedSwiGLU:
    if backend == "gpu":
        return PALLAS
    if interpret:
        return PALLAS_INTERPRETED
    raise _unavailable("pallas", f"runs Triton kernels on NVIDIA GPUs only, not on {backend}; "
                       f"choose one of {', '.join(GROUPED_KERNELS.names)} (auto picks for the backend)")


GROUPED_KERNELS.register("auto", lambda backend, interpret: GROUPED_KERNELS.get(
    AUTO_GROUPED.get(backend, "ragged_dot"))(backend, interpret))
GROUPED_KERNELS.register("tokamax", _tokamax)
GROUPED_KERNELS.register("pallas", _pallas)
GROUPED_KERNELS.register("ragged_dot", lambda backend, interpret: RAGGED)
GROUPED_KERNELS.register("cpu", lambda backend, interpret: CPU)


def grouped_kernel(name: str, backend: str | None = None, *, interpret: bool = False) -> GroupedSwiGLU:
    """The grouped SwiGLU `model.grouped_kernel: name` runs on `backend` (default: jax's); a
    one-line ConfigError when it cannot run there. interpret: Pallas' interpreter on a CPU (tests)."""
    return GROUPED_KERNELS.get(name)(backend or jax.default_backend(), interpret)


@dataclass(frozen=True)
class Kernels:
    """grouped: the grouped SwiGLU of the dropless and capacity dispatch (grouped.py).
    matmul_custom_gradient: every projection's weight gradient from a transposed copy of its
    input rows (matmul.py; faster on XLA:CPU only). segment_bounds: documents-per-row bounds of
    cuDNN's segment layout, tried in order (packed_attention.py; Hopper or later only, which
    `for_backend` checks); () = documents as a mask.
    attention_library: the kernel `jax.nn.dot_product_attention` is asked for under
    `model.attention_impl: dot_product` ("cudnn" on NVIDIA GPUs; "xla" forces XLA's composition
    through the same call); None = our own attention. max_unrolled_layers: `model.scan_unroll:
    auto` unrolls the layer scan fully up to this many layers, else loops (see `scan_unroll`).
    exchange: the expert-parallel token exchange, "padded" (all_to_all of worst-case buffers)
    or "ragged" (`ragged_all_to_all`); see parallel/expert_parallel.py. backend: the one these
    were chosen for. fp8: matmul inputs rounded to FP8 (fp8.py): `matmul`'s, and the expert
    matmuls' through `expert_inputs`."""

    grouped: GroupedSwiGLU
    matmul_custom_gradient: bool
    segment_bounds: tuple[int, ...]
    attention_library: str | None
    max_unrolled_layers: int = 0
    exchange: str = "padded"
    backend: str = "cpu"
    fp8: bool = False

    @classmethod
    def for_backend(cls, backend: str | None = None, grouped: str = "auto") -> "Kernels":
        """The measured-fastest choice for `backend` (default: jax's default backend); grouped:
        a `model.grouped_kernel` name (auto = AUTO_GROUPED's for the backend)."""
        backend = backend or jax.default_backend()
        kernel = grouped_kernel(grouped, backend)
        exchange = EXCHANGE.get(backend, "padded")
        if backend == "cpu":
            return cls(kernel, matmul_custom_gradient=True, segment_bounds=(), attention_library=None,
                       max_unrolled_layers=CPU_MAX_UNROLLED_LAYERS, exchange=exchange, backend=backend)
        if backend == "gpu":
            bounds = packed_attention.SEGMENT_BOUNDS if packed_attention.supported() else ()
            return cls(kernel, matmul_custom_gradient=False, segment_bounds=bounds, attention_library="cudnn",
                       exchange=exchange, backend=backend)
        return cls(kernel, matmul_custom_gradient=False, segment_bounds=(), attention_library=None,
                   exchange=exchange, backend=backend)

    def with_choices(self, grouped_kernel_name: str = "auto", use_fp8: bool = False) -> "Kernels":
        """These kernels with a config's `model.grouped_kernel` (auto keeps `grouped` as it is,
        so a caller's own choice stands) and `model.fp8` (on stays on) applied. Idempotent: the
        model applies it where it is built and again in each MoE block."""
        grouped = self.grouped if grouped_kernel_name == "auto" else grouped_kernel(grouped_kernel_name, self.backend)
        return self.replace(grouped=grouped, fp8=self.fp8 or use_fp8)

    def replace(self, **changes) -> "Kernels":
        return dataclasses.replace(self, **changes)

    def scan_unroll(self, requested: int | str, n_layers: int) -> int:
        """Layers per iteration of the layer scan for `model.scan_unroll` (a number, or auto)."""
        if requested == "auto":
            return n_layers if n_layers <= self.max_unrolled_layers else 1
        return min(int(requested), n_layers)

    def matmul(self, x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
        """x [N, K] @ w [K, M], every projection's one entry point."""
        if self.fp8:
            x, w = fp8.matmul_inputs(x, w)
        return rows_matmul(x, w, out_dtype, custom_gradient=self.matmul_custom_gradient)

    def expert_inputs(self, x: jax.Array, *weights: jax.Array) -> tuple[jax.Array, ...]:
        """The token rows [N, D] and stacked expert weights [E, in, out] the expert matmuls take:
        rounded to FP8 when `fp8` is on, before any dispatch, so on the global arrays (the same
        scales whatever the mesh splits), else as they are."""
        return fp8.expert_inputs(x, *weights) if self.fp8 else (x, *weights)
