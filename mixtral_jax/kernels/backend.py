"""Which kernels a model runs, resolved once from the backend.

The model never asks `jax.default_backend()` itself: it is built with a `Kernels` (by default
`Kernels.for_backend()`) and calls `kernels.matmul`, `kernels.grouped` and reads
`kernels.segment_bounds`. A benchmark or test that wants another choice builds the model with
its own `Kernels` (e.g. `Kernels.for_backend().replace(matmul_custom_gradient=False)`), rather
than patching a module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from mixtral_jax.kernels import packed_attention
from mixtral_jax.kernels.grouped import CPU, PALLAS, RAGGED, GroupedSwiGLU
from mixtral_jax.kernels.matmul import rows_matmul


# On XLA:CPU a scanned layer reads its weights through a dynamic slice of the stacked arrays,
# which copies them every step; unrolled layers slice statically. Unrolling costs compile time
# that grows with depth (`python -m benchmarks.compile_time --unrolled`, 2-core CPU, jax 0.10.2:
# the tiny MoE's step compiles in 6.5 s as a loop at any depth; unrolled 7.5 s at 4 layers, 11.1 s
# at 8, 19.2 s at 16, 40.9 s at 32; the tiny dense model 2.8 s as a loop, 3.7 s unrolled at 8).
# Up to 8 layers the unrolled compile stays under 2x the loop's, so auto unrolls there. Other
# backends keep the loop: their slices are not copies, and their models are deep.
CPU_MAX_UNROLLED_LAYERS = 8


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
    auto` unrolls the layer scan fully up to this many layers, else loops (see `scan_unroll`)."""

    grouped: GroupedSwiGLU
    matmul_custom_gradient: bool
    segment_bounds: tuple[int, ...]
    attention_library: str | None
    max_unrolled_layers: int = 0

    @classmethod
    def for_backend(cls, backend: str | None = None) -> "Kernels":
        """The measured-fastest choice for `backend` (default: jax's default backend)."""
        backend = backend or jax.default_backend()
        if backend == "cpu":
            return cls(CPU, matmul_custom_gradient=True, segment_bounds=(), attention_library=None,
                       max_unrolled_layers=CPU_MAX_UNROLLED_LAYERS)
        if backend == "gpu":
            bounds = packed_attention.SEGMENT_BOUNDS if packed_attention.supported() else ()
            return cls(PALLAS, matmul_custom_gradient=False, segment_bounds=bounds, attention_library="cudnn")
        return cls(RAGGED, matmul_custom_gradient=False, segment_bounds=(), attention_library=None)

    def replace(self, **changes) -> "Kernels":
        return dataclasses.replace(self, **changes)

    def scan_unroll(self, requested: int | str, n_layers: int) -> int:
        """Layers per iteration of the layer scan for `model.scan_unroll` (a number, or auto)."""
        if requested == "auto":
            return n_layers if n_layers <= self.max_unrolled_layers else 1
        return min(int(requested), n_layers)

    def matmul(self, x: jax.Array, w: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
        """x [N, K] @ w [K, M], every projection's one entry point."""
        return rows_matmul(x, w, out_dtype, custom_gradient=self.matmul_custom_gradient)
