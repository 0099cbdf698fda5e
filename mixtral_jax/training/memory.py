"""Memory planner: estimated bytes per device of one training step on a mesh, by component,
and whether it fits a named accelerator. Nothing is allocated or compiled: parameter shapes come
from `nnx.eval_shape`, their per-device shards from the logical axis rules.

Components (per device):
- params: every parameter's shard under the rules (replicated ones whole);
- optimizer: AdamW's two moments, shaped and sharded like the params;
- gradients: one sharded copy (two with gradient accumulation: the running sum and the new one);
- activations: what the backward pass keeps for the local microbatch (tokens / (data-like axes x
  grad_accum)), per the remat policy, plus the layer being recomputed, plus the float32 logits;
- workspace: weights gathered for the layer at hand under FSDP (two layers in flight) and, with
  a `data` axis, the expert weights' gradients before their sum over it (the shard_map dispatch
  makes a per-device copy; FSDP-split weights are reduce-scattered instead). The
  expert-parallel send / receive buffers are counted with the activations.
The activation terms count the arrays the model code materialises (see `_per_token_layer`); XLA
may fuse some away or keep extra copies. The layers are planned as the loop they run as on
GPUs and TPUs (`model.scan_unroll: auto` there); unrolled layers let XLA keep more per layer. tests/test_memory.py holds the total to within 25% of
XLA's own `compile().memory_analysis()` on small CPU configs; treat the figure as a planning
estimate and confirm with `compile()` on the target mesh (`mixtral-jax compile`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from mixtral_jax.config import Config, ConfigError, ModelConfig, did_you_mean
from mixtral_jax.hardware import ACCELERATORS, BY_NAME
from mixtral_jax.models.routing import capacity_size
from mixtral_jax.parallel.mesh import BATCH_AXES, MESH_AXES
from mixtral_jax.parallel.rules import logical_names, logical_to_spec

GIB = 1024**3
# Of the memory a device is sold with (hardware.py), what a step may plan for: the rest is left
# to the runtime, XLA's scratch and fragmentation.
USABLE_FRACTION = 0.9
# Which of a layer's activation terms (`_per_token_layer`) each `model.remat` policy keeps for the
# backward pass; tests/test_registries.py checks it covers every policy the registry declares.
KEPT_BY_REMAT = {"none": "all", "dots_saveable": "dots", "full": "input"}


@dataclass(frozen=True)
class MemoryPlan:
    mesh: dict[str, int]
    local_tokens: int  # tokens per device per microbatch
    params: int
    optimizer: int
    gradients: int
    activations: int
    workspace: int

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations + self.workspace

    def fits(self, device: str) -> bool:
        return self.total <= usable_bytes(device)

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def usable_bytes(device: str) -> int:
    return int(device_memory_gib(device) * GIB * USABLE_FRACTION)


def device_memory_gib(device: str) -> float:
    """Memory of a named accelerator (hardware.py), or a one-line error naming the known ones."""
    if device not in ACCELERATORS:
        raise ConfigError(f"unknown device '{device}': one of {', '.join(ACCELERATORS)}"
                          f"{did_you_mean(device, ACCELERATORS)}")
    return BY_NAME[device].memory_gib


MAX_MESH_DEVICES = 2**20  # beyond any cluster; keeps the planner's arithmetic (and compile) sane


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=4,expert=2' -> sizes for all four axes (unnamed axes 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    named: set[str] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, sep, value = (s.strip() for s in part.partition("="))
        if axis not in sizes:
            raise ConfigError(f"--mesh: unknown axis '{axis}'{did_you_mean(axis, MESH_AXES)} "
                              f"(axes are {', '.join(MESH_AXES)})")
        if axis in named:
            raise ConfigError(f"--mesh: axis '{axis}' is given twice")
        # ASCII digits only: str.isdigit() also accepts '²', which int() then rejects
        if not sep or not re.fullmatch(r"[0-9]{1,8}", value) or int(value) < 1:
            raise ConfigError(f"--mesh '{part}': expected {axis}=N with N >= 1")
        sizes[axis] = int(value)
        named.add(axis)
    if math.prod(sizes.values()) > MAX_MESH_DEVICES:
        raise ConfigError(f"--mesh '{text}': {math.prod(sizes.values()):,} devices in total; at most "
                          f"{MAX_MESH_DEVICES:,} are supported")
    return sizes


def _split_axes(names, shape, mesh: AbstractMesh) -> list[str]:
    """The mesh axes the rules split this array over."""
    spec = logical_to_spec(names, shape, mesh) if names and len(names) == len(shape) else ()
    return [axis for axes in spec for axis in ((axes,) if isinstance(axes, str) else (axes or ()))]


def _param_bytes(model_cfg: ModelConfig, mesh: AbstractMesh) -> tuple[int, int]:
    """Bytes per device: (all params, one layer's weights gathered over fsdp in compute dtype,
    the expert weights' gradients as the shard_map dispatch produces them before their sum over
    the token shards that hold the same weights)."""
    from mixtral_jax.models.transformer import Transformer

    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    compute = jnp.dtype(model_cfg.dtype).itemsize
    local, gathered_layer, expert_grads = 0, 0, 0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        shape, size = var.shape, math.prod(var.shape)
        axes = _split_axes(logical_names(var), shape, mesh)
        factor = math.prod(mesh.shape[a] for a in axes)
        local += size * var.dtype.itemsize // factor
        if str(path[0]) == "blocks":  # stacked [layers, ...]: one layer, unsplit over fsdp
            fsdp = mesh.shape["fsdp"] if "fsdp" in axes else 1
            gathered_layer += size // shape[0] * compute * fsdp // factor
            # Replicated over data (or over an fsdp axis that does not split them): their
            # gradients are summed over those token shards from a per-device copy, which XLA
            # keeps for the whole layer stack (measured at 4 and 12 layers, data=8).
            unsplit_tokens = mesh.shape["data"] * (mesh.shape["fsdp"] if fsdp == 1 else 1)
            if "expert" in (logical_names(var) or ()) and unsplit_tokens > 1:
                expert_grads += size * var.dtype.itemsize // factor
    return local, gathered_layer, expert_grads


def _split(n: int, ways: int) -> float:
    """n units over `ways` devices when it divides (the rules replicate otherwise)."""
    return n / ways if ways > 1 and n % ways == 0 else n


def _moe_rows_per_token(cfg: Config, mesh: dict[str, int], local_tokens: int) -> float:
    """Rows the expert computation holds per local token (the dispatcher's buffers)."""
    moe = cfg.model.moe
    e, k = moe.num_experts, moe.top_k
    if moe.dispatch == "dense":  # every expert on every token
        return float(e)
    if moe.router == "expert_choice":  # E experts x C = N * capacity_factor / E tokens each
        return moe.capacity_factor
    x = mesh["expert"]
    rows = local_tokens * k
    if moe.dispatch == "capacity":
        global_tokens = local_tokens * math.prod(mesh[a] for a in BATCH_AXES)
        rows = min(rows, e // x * capacity_size(global_tokens, k, e, moe.capacity_factor))
    return x * rows / local_tokens


def _per_token_layer(cfg: Config, mesh: dict[str, int], local_tokens: int, sparse: bool) -> dict[str, float]:
    """Bytes per local token for one layer (sparse or dense FFN): `all` (everything autodiff keeps
    with no remat), `dots` (what dots_saveable keeps) and `input` (what full remat keeps: the
    layer input)."""
    m = cfg.model
    dt, f32 = jnp.dtype(m.dtype).itemsize, 4
    t, d, hd = cfg.data.seq_len, m.dim, m.head_dim
    tp = mesh["tensor"]
    heads = _split(m.n_heads, tp)
    q, kv = heads * hd, _split(m.n_kv_heads, tp) * hd
    scores = heads * t * f32  # plain attention materialises [T, T] scores per head
    attn_all = (4 * d + 2 * (q + 2 * kv) + q + d) * dt + 3 * scores  # scores, masked, probs
    attn_dots = (d + q + 2 * kv + q + d) * dt + scores
    if sparse:
        h = _split(m.expert_width, tp)
        rows = _moe_rows_per_token(cfg, mesh, local_tokens)
        k = m.moe.top_k
        ffn_all = 2 * m.moe.num_experts * f32 + rows * (2 * d + 2 * h) * dt + 2 * k * d * dt
        # the grouped matmul is one custom_vjp call: dots_saveable keeps its output, not its insides
        ffn_dots = m.moe.num_experts * f32 + k * d * dt
        if m.shared_width:  # the shared experts: a dense MLP every token passes through
            sh = _split(m.shared_width, tp)
            ffn_all += (4 * sh + d) * dt
            ffn_dots += (2 * sh + d) * dt
    else:
        h = _split(m.hidden_dim, tp)
        ffn_all = (4 * h + d) * dt
        ffn_dots = (2 * h + d) * dt
    return {"all": attn_all + ffn_all, "dots": attn_dots + ffn_dots, "input": d * dt}


def plan_memory(cfg: Config, mesh_sizes: dict[str, int]) -> MemoryPlan:
    """The estimate for `cfg` trained on a mesh of `mesh_sizes` (all four axes, no -1)."""
    mesh = {a: int(mesh_sizes.get(a, 1)) for a in MESH_AXES}
    abstract_mesh = AbstractMesh(tuple(mesh[a] for a in MESH_AXES), MESH_AXES)
    rows_split = math.prod(mesh[a] for a in BATCH_AXES)
    batch, accum = cfg.data.batch_size, cfg.optim.grad_accum
    if batch % (rows_split * accum):
        raise ConfigError(f"data.batch_size ({batch}) is not divisible by the data-like mesh axes "
                          f"({rows_split}) x optim.grad_accum ({accum})")
    local_tokens = batch // (rows_split * accum) * cfg.data.seq_len
    params, gathered_layer, expert_grads = _param_bytes(cfg.model, abstract_mesh)
    kept = KEPT_BY_REMAT[cfg.model.remat]
    saved, recompute = 0.0, 0.0
    n_sparse = cfg.model.n_sparse_layers
    for sparse, count in ((True, n_sparse), (False, cfg.model.n_layers - n_sparse)):
        if count:
            per_layer = _per_token_layer(cfg, mesh, local_tokens, sparse)
            saved += count * per_layer[kept]
            if cfg.model.remat != "none":  # one layer rebuilt in backward
                recompute = max(recompute, per_layer["all"])
    vocab = _split(cfg.model.vocab_size, mesh["tensor"])
    logits = 3 * vocab * 4  # float32 logits, their softmax and their gradient
    activations = int(local_tokens * (saved + recompute + logits))
    workspace = (2 * gathered_layer if mesh["fsdp"] > 1 else 0) + expert_grads
    return MemoryPlan(mesh=mesh, local_tokens=local_tokens, params=params, optimizer=2 * params,
                      gradients=params * (2 if accum > 1 else 1), activations=activations, workspace=workspace)


def format_plan(plan: MemoryPlan, device: str | None) -> str:
    shape = " x ".join(f"{a}={v}" for a, v in plan.mesh.items() if v > 1) or "one device"
    rows = [("params", plan.params), ("optimizer (AdamW mu, nu)", plan.optimizer),
            ("gradients", plan.gradients), ("activations", plan.activations),
            ("workspace (gathers, expert grads)", plan.workspace), ("total", plan.total)]
    lines = [f"estimated memory per device, mesh {shape}, {plan.local_tokens:,} tokens per device per microbatch"]
    lines += [f"  {name:<34}{value / GIB:>10.2f} GiB" for name, value in rows]
    if device:
        cap = usable_bytes(device)
        verdict = "fits" if plan.fits(device) else "does NOT fit"
        lines.append(f"  {verdict} {device} ({device_memory_gib(device):g} GiB, {cap / GIB:.1f} GiB usable: "
                     f"{plan.total / cap:.0%} used)")
    return "\n".join(lines)
