"""Building blocks shared by the dense and MoE models: parameter helper, RMSNorm, RoPE, SwiGLU.

Conventions used across mixtral_jax.models:
- Parameters are stored in `param_dtype` and carry logical axis names (`out_sharding` metadata)
  that parallel/mesh rules map onto the device mesh. Eager sharding is off, so a model can be
  built without a mesh; shard it by jitting the constructor with `out_shardings` derived from
  `nnx.get_partition_spec` under logical axis rules.
- Matmuls run in the compute `dtype`: both operands are cast right before the op.
- Norms, softmaxes and the router run in float32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config.choices import DTYPES
from mixtral_jax.kernels.backend import Kernels

DTYPES.register("float32", jnp.float32)
DTYPES.register("bfloat16", jnp.bfloat16)
DTYPES.register("float16", jnp.float16)

INIT_STD = 0.02


def as_dtype(name: str | jnp.dtype) -> jnp.dtype:
    """A config dtype name ("bfloat16") or dtype -> a jnp dtype."""
    return DTYPES.get(name) if isinstance(name, str) else name


def make_param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: jnp.dtype,
    std: float | None = INIT_STD,
) -> nnx.Param:
    """A Param of `shape` with logical axis names `axes`; normal(std) init, or ones if std is None."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {tuple(axes)} do not match shape {tuple(shape)}")
    init = nnx.initializers.ones_init() if std is None else nnx.initializers.normal(std)
    # eager_sharding=False: annotate only; placement is decided by whoever builds the model.
    init = nnx.with_partitioning(init, tuple(axes), eager_sharding=False)
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype))


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, *, param_dtype: jnp.dtype = jnp.float32,
                 axis: str | None = "embed"):
        """axis: the weight's logical axis name (a norm over a head's features is not "embed")."""
        self.eps = eps
        self.weight = make_param(None, (dim,), (axis,), as_dtype(param_dtype), std=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of shape [B, T, head_dim] in float32, laid out as HF's (freqs, freqs) concat."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding of x [B, T, H, D] at integer positions [B, T].

    Uses the "half-split" layout of HF's `rotate_half`: dimension i is paired with i + D/2
    (not with its neighbour), so HF / Mistral q_proj and k_proj weights are used unpermuted.
    """
    cos, sin = rope_angles(positions, x.shape[-1], theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: w_down(silu(x w_gate) * (x w_up)), no biases."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        out_std: float = INIT_STD,
        kernels: Kernels | None = None,
        rngs: nnx.Rngs,
    ):
        self.kernels = kernels or Kernels.for_backend()
        self.dtype = as_dtype(dtype)
        pdt = as_dtype(param_dtype)
        self.w_gate = make_param(rngs, (dim, hidden_dim), ("embed", "mlp"), pdt)
        self.w_up = make_param(rngs, (dim, hidden_dim), ("embed", "mlp"), pdt)
        self.w_down = make_param(rngs, (hidden_dim, dim), ("mlp", "embed"), pdt, std=out_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        # Token rows flattened to one matrix axis: on [B, T, D] the CPU compiler fused silu's
        # backward with a transposed copy of the activations (measured ~15% of a dense step).
        rows = x.reshape(-1, x.shape[-1]).astype(dt)
        matmul = self.kernels.matmul
        gate = matmul(rows, self.w_gate[...].astype(dt))
        up = matmul(rows, self.w_up[...].astype(dt))
        out = matmul(jax.nn.silu(gate) * up, self.w_down[...].astype(dt))
        return out.reshape(*x.shape[:-1], out.shape[-1])
