"""Decoder-only transformer (Mistral dense, Mixtral and later MoE designs) with layers stacked
and scanned, and a KV-cached decode path for generation."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.config.choices import REMAT_POLICIES
from mixtral_jax.kernels.backend import Kernels
from mixtral_jax.kernels.grouped_pallas import SAVE_NAME as GROUPED_MATMUL
from mixtral_jax.kernels.matmul import SAVE_NAME as ROWS_MATMUL
from mixtral_jax.models.attention import Attention, KVCache
from mixtral_jax.models.layer_plan import plan_model
from mixtral_jax.models.layers import INIT_STD, MLP, RMSNorm, as_dtype, make_param
from mixtral_jax.models.moe import MoEBlock
from mixtral_jax.parallel.rules import constrain

LAYERS_AXIS = "layers"
RESIDUAL = ("batch", None, None)  # the residual stream's layout: rows split, model dim whole
# Metadata transform for nnx.vmap / nnx.scan: the stacked axis of every layer parameter is
# named "layers" in its logical sharding (added on creation, stripped inside the scan body).
LAYER_METADATA = {nnx.PARTITION_NAME: LAYERS_AXIS}

# name -> jax.checkpoint policy; "none" skips remat altogether.
REMAT_POLICIES.register("none", None)
REMAT_POLICIES.register("full", None)  # save nothing, recompute the whole layer in the backward pass
# keep matmul outputs, the GPU grouped-matmul kernels' and the CPU custom-gradient matmuls'
# included (a custom call or custom gradient hides its dot from dots_saveable)
REMAT_POLICIES.register("dots_saveable", jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_saveable,
    jax.checkpoint_policies.save_only_these_names(GROUPED_MATMUL, ROWS_MATMUL)))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x)); ffn = MoEBlock (sparse)
    or the dense SwiGLU MLP of model.hidden_dim."""

    def __init__(self, cfg: ModelConfig, *, sparse: bool, kernels: Kernels, rngs: nnx.Rngs):
        pdt = as_dtype(cfg.param_dtype)
        self.is_moe = sparse
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=pdt)
        self.attn = Attention(cfg, kernels=kernels, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=pdt)
        if sparse:
            self.ffn = MoEBlock(cfg, kernels=kernels, rngs=rngs)
        else:
            out_std = INIT_STD / (2 * cfg.n_layers) ** 0.5
            self.ffn = MLP(cfg.dim, cfg.hidden_dim, dtype=cfg.dtype, param_dtype=pdt, out_std=out_std,
                           kernels=kernels, rngs=rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, router_rng: jax.Array | None = None,
        capture_routing: bool = False,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = x + self.attn(self.attn_norm(x), positions, segment_ids).astype(x.dtype)
        if self.is_moe:
            y, stats = self.ffn(self.ffn_norm(x), router_rng, capture_routing)
        else:
            y = self.ffn(self.ffn_norm(x))
            zero = jnp.zeros((), jnp.float32)
            stats = {"aux_loss": zero, "z_loss": zero}
        return x + y.astype(x.dtype), stats

    def decode(self, x: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """The cached counterpart of __call__ for generation: no router noise, no stats. The MoE
        ffn runs unchanged; its dropless dispatch is exact on any number of tokens."""
        attn_out, cache = self.attn.decode(self.attn_norm(x), positions, cache)
        x = x + attn_out.astype(x.dtype)
        if self.is_moe:
            y, _ = self.ffn(self.ffn_norm(x))
        else:
            y = self.ffn(self.ffn_norm(x))
        return x + y.astype(x.dtype), cache


def _units(stacked: jax.Array, start: int, repeats: int, size: int) -> jax.Array:
    """Rows start .. start + repeats * size of a stacked array as [repeats, size, ...], or as
    [repeats, ...] when size is 1. A stack taken whole is not sliced, and one-layer units are
    not reshaped: the scan then reads the parameters themselves, and its backward pass reads
    them again rather than keeping a copy (measured: +18% temp memory under full remat)."""
    rows = repeats * size
    if not (start == 0 and rows == stacked.shape[0]):
        stacked = jax.lax.slice_in_dim(stacked, start, start + rows)
    return stacked if size == 1 else stacked.reshape(repeats, size, *stacked.shape[1:])


class ModelOutput(NamedTuple):
    """`logits, aux = model(tokens)` unpacks it; `model(tokens).logits` reads like HF's outputs."""

    logits: jax.Array
    aux: dict[str, jax.Array]


class Transformer(nnx.Module):
    """tokens [B, T] -> (logits [B, T, vocab] float32, aux).

    aux: `aux_loss`, `z_loss` (means over the sparse layers, unscaled; 0 for dense models) and,
    for MoE, `expert_load` [sparse layers, E], `router_entropy`, `dropped_fraction` (means over
    the sparse layers).
    Layer parameters are stacked on a leading "layers" axis: `blocks` holds every layer of a
    dense model, the sparse layers of an MoE model, whose dense layers (model.moe.
    first_dense_layers, sparse_every, dense_layers) are `dense_blocks`. The layers run in order
    as the segments of layer_plan.plan_segments, one scan each, so compile time does not grow
    with depth. With loss-free balancing the model state (not the Params) holds
    blocks/ffn/router_bias, a RouterBias [sparse layers, E].
    """

    def __init__(self, cfg: ModelConfig, *, kernels: Kernels | None = None, rngs: nnx.Rngs):
        """kernels: the backend-specific compute every layer runs; default
        `Kernels.for_backend()`, the measured-fastest for jax's default backend."""
        kernels = (kernels or Kernels.for_backend()).with_choices(cfg.grouped_kernel, cfg.fp8)
        self.kernels = kernels
        self.remat_policy = REMAT_POLICIES.get(cfg.remat)
        # Keep scalars, not the (unhashable) config dataclass: module statics go in the graphdef.
        self.is_moe = cfg.is_moe
        self.n_layers = cfg.n_layers
        moe = cfg.moe
        self.segments = plan_model(cfg.n_layers, cfg.is_moe, moe.first_dense_layers, moe.sparse_every, moe.dense_layers)
        n_sparse = cfg.n_sparse_layers
        # For generation: cache geometry, and the longest sequence a full-attention cache may hold.
        self.sliding_window = cfg.sliding_window
        self.max_seq_len = cfg.max_seq_len
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.tie_embeddings = cfg.tie_embeddings
        self.remat = cfg.remat
        self.scan_unroll = kernels.scan_unroll(cfg.scan_unroll, cfg.n_layers)
        self.dtype = as_dtype(cfg.dtype)
        pdt = as_dtype(cfg.param_dtype)

        self.embed = make_param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), pdt)

        def make_blocks(kind_is_sparse: bool) -> Block:
            @nnx.split_rngs(splits=n_sparse if kind_is_sparse else cfg.n_layers - n_sparse)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYER_METADATA)
            def make(layer_rngs: nnx.Rngs) -> Block:
                return Block(cfg, sparse=kind_is_sparse, kernels=kernels, rngs=layer_rngs)
            return make(rngs)

        self.blocks = make_blocks(cfg.is_moe)
        self.dense_blocks = make_blocks(False) if cfg.is_moe and n_sparse < cfg.n_layers else None
        self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=pdt)
        if not cfg.tie_embeddings:
            self.lm_head = make_param(rngs, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), pdt)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        router_rng: jax.Array | None = None,
        capture_routing: bool = False,
    ) -> ModelOutput:
        """router_rng: a key for MoE router jitter (training, fresh per step), split per layer;
        None (eval, generation) = no noise. capture_routing (MoE): aux also holds `top_experts`
        [n_layers, B, T, k], every layer's expert choice per token."""
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        dt = self.dtype
        # Gather the table's fsdp shards first (as FSDP does for every weight): a lookup into a
        # table split along the model dim yields rows split the same way, which XLA can only
        # turn into the batch-split residual stream by replicating them.
        table = constrain(self.embed[...], ("vocab", None))
        x = constrain(jnp.take(table, tokens, axis=0).astype(dt), RESIDUAL)

        # One key per layer, scanned with the blocks (None scans as an empty pytree).
        layer_rngs = None if router_rng is None else jax.random.split(router_rng, self.n_layers)

        def layer(block: Block, x: jax.Array, rng: jax.Array | None, pos: jax.Array, seg: jax.Array
                  ) -> tuple[jax.Array, None, dict]:
            x, stats = block(x, pos, seg, rng, capture_routing)
            return constrain(x, RESIDUAL), None, stats

        x, _, stats = self._run_layers(x, layer_rngs, layer, (positions, segment_ids), remat=self.remat != "none")
        return ModelOutput(self._head(x).astype(jnp.float32), self._aux(stats[self.is_moe], capture_routing))

    def _stack(self, sparse: bool) -> nnx.Module:
        """The stacked blocks of one kind of layer."""
        return self.blocks if sparse == self.is_moe else self.dense_blocks

    def _run_layers(self, x: jax.Array, per_layer: Any, layer: Callable, shared: tuple = (), remat: bool = False
                    ) -> tuple[jax.Array, Any, dict[bool, Any]]:
        """Run every layer in order, as the plan's segments, one jax.lax.scan each.

        per_layer: a pytree of [n_layers, ...] arrays (or None); each layer gets its slice.
        shared: arrays every layer takes whole, passed as arguments (not closed over) so that a
        rematerialised layer recomputes what it derives from them.
        layer(block, x, inputs, *shared) -> (x, out, stats): `out` has one structure for every layer and
        comes back stacked [n_layers, ...] in layer order; `stats` may differ between sparse and
        dense layers and comes back per kind, {sparse: stacked [layers of that kind, ...]}.
        """
        kinds = sorted({kind for seg in self.segments for kind in seg.unit})
        split = {kind: nnx.split(self._stack(kind)) for kind in kinds}

        def apply(kind: bool, index: int, position: int, single_of_kind: bool, single_layer: bool) -> Callable:
            """Layer `position` of a unit: the `index`-th of its kind. It takes the whole unit's
            slices and picks its own inside, so that under remat the saved inputs are the scan's
            slices of the stacks, which the backward pass reads again, not copies of the weights."""
            graphdef = split[kind][0]

            def run(unit_state: Any, x: jax.Array, unit_inputs: Any, *shared: jax.Array):
                state = unit_state if single_of_kind else jax.tree.map(lambda a: a[index], unit_state)
                inputs = unit_inputs if single_layer else jax.tree.map(lambda a: a[position], unit_inputs)
                return layer(nnx.merge(graphdef, state), x, inputs, *shared)
            # Checkpoint each layer; prevent_cse is unnecessary inside a scan.
            return jax.checkpoint(run, policy=self.remat_policy, prevent_cse=False) if remat else run

        cursor = dict.fromkeys(kinds, 0)
        outs, stats = [], {kind: [] for kind in kinds}
        for seg in self.segments:
            size, repeats = len(seg.unit), seg.repeats
            states = {}
            for kind in kinds:
                n = seg.count(kind)
                if n:
                    lo = cursor[kind]
                    states[kind] = jax.tree.map(lambda a, lo=lo, n=n: _units(a, lo, repeats, n), split[kind][1])
                    cursor[kind] += repeats * n
            inputs = jax.tree.map(lambda a: _units(a, seg.start, repeats, size),
                                  per_layer)

            def unit(x: jax.Array, xs: tuple, seg=seg) -> tuple[jax.Array, tuple]:
                unit_states, unit_inputs = xs
                seen = dict.fromkeys(kinds, 0)
                unit_outs, unit_stats = [], {kind: [] for kind in kinds}
                for j, kind in enumerate(seg.unit):
                    run = apply(kind, seen[kind], j, seg.count(kind) == 1, len(seg.unit) == 1)
                    x, out, st = run(unit_states[kind], x, unit_inputs, *shared)
                    seen[kind] += 1
                    unit_outs.append(out)
                    unit_stats[kind].append(st)
                stack = lambda items: jax.tree.map(lambda *a: jnp.stack(a), *items)  # noqa: E731
                return x, (stack(unit_outs), {kind: stack(v) for kind, v in unit_stats.items() if v})

            unroll = max(1, min(repeats, self.scan_unroll // size))
            x, (out, st) = jax.lax.scan(unit, x, (states, inputs), unroll=unroll)
            outs.append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), out))  # [repeats, size, ...] -> layers
            for kind, value in st.items():
                stats[kind].append(jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), value))
        concat = lambda parts: jax.tree.map(lambda *a: jnp.concatenate(a), *parts)  # noqa: E731
        return x, concat(outs), {kind: concat(parts) for kind, parts in stats.items() if parts}

    def _aux(self, stats: dict[str, jax.Array], capture_routing: bool) -> dict[str, jax.Array]:
        """The model's aux outputs from the layers' stats stacked [n_layers, ...]: losses and
        router figures averaged over layers, per-layer expert loads (and choices) kept."""
        aux = {"aux_loss": jnp.mean(stats["aux_loss"]), "z_loss": jnp.mean(stats["z_loss"])}
        if self.is_moe:
            aux["expert_load"] = stats["expert_load"]
            aux["router_entropy"] = jnp.mean(stats["router_entropy"])
            aux["dropped_fraction"] = jnp.mean(stats["dropped_fraction"])
            if capture_routing:
                aux["top_experts"] = stats["top_experts"]
        return aux

    def _head(self, x: jax.Array) -> jax.Array:
        """Final norm and output projection: residual stream [B, T, dim] -> logits [B, T, V]."""
        return self.output_logits(self.final_norm(x))

    def output_logits(self, x: jax.Array) -> jax.Array:
        """The output projection alone (the LM head, or the embedding when tied): final-normed
        hidden states [B, T, dim] -> float32 logits [B, T, V]. Scoring calls it on the few
        positions it reads."""
        dt = self.dtype
        b, t, d = x.shape
        rows = x.reshape(b * t, d).astype(dt)  # one 2-D matmul (the CPU compiler's fastest form)
        weight = self.embed[...].T if self.tie_embeddings else self.lm_head[...]  # [dim, vocab]
        logits = self.kernels.matmul(rows, weight.astype(dt), out_dtype=jnp.float32)
        return constrain(logits.reshape(b, t, -1), ("batch", None, "vocab"))

    def cache_slots(self, max_len: int) -> int:
        """Slots per layer for sequences of up to max_len positions: the window when there is
        one (a rolling buffer), since older keys are never attended to again."""
        return min(self.sliding_window, max_len) if self.sliding_window else max_len

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> KVCache:
        """An empty KVCache stacked over layers: k / v [L, B, S, KV, Dh], pos [L, B, S] = -1,
        with S = cache_slots(max_len), in the compute dtype unless `dtype` is given."""
        layer = KVCache.empty(batch, self.cache_slots(max_len), self.n_kv_heads, self.head_dim,
                              self.dtype if dtype is None else dtype)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (self.n_layers, *a.shape)), layer)

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """tokens / positions [B, T] (absolute, following everything already in the cache) ->
        (logits [B, T, V] float32, the updated cache). A prompt prefill and a one-token step are
        the same call; logits equal those of __call__ over the whole sequence so far."""
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)

        def layer(block: Block, x: jax.Array, layer_cache: KVCache) -> tuple[jax.Array, KVCache, None]:
            x, layer_cache = block.decode(x, positions, layer_cache)
            return x, layer_cache, None

        x, cache, _ = self._run_layers(x, cache, layer)
        return self._head(x).astype(jnp.float32), cache
