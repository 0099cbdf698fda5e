"""Decoder-only transformer (Mistral dense / Mixtral MoE) with layers stacked and scanned,
a KV-cached decode path for generation, and parameter counting without allocation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.config import ModelConfig
from mixtral_jax.config.choices import REMAT_POLICIES
from mixtral_jax.kernels.backend import Kernels
from mixtral_jax.kernels.grouped_pallas import SAVE_NAME as GROUPED_MATMUL
from mixtral_jax.kernels.matmul import SAVE_NAME as ROWS_MATMUL
from mixtral_jax.models.attention import Attention, KVCache
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
    """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x)); ffn = MLP or MoEBlock."""

    def __init__(self, cfg: ModelConfig, *, kernels: Kernels, rngs: nnx.Rngs):
        pdt = as_dtype(cfg.param_dtype)
        self.is_moe = cfg.is_moe
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=pdt)
        self.attn = Attention(cfg, kernels=kernels, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=pdt)
        if cfg.is_moe:
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


class ModelOutput(NamedTuple):
    """`logits, aux = model(tokens)` unpacks it; `model(tokens).logits` reads like HF's outputs."""

    logits: jax.Array
    aux: dict[str, jax.Array]


class Transformer(nnx.Module):
    """tokens [B, T] -> (logits [B, T, vocab] float32, aux).

    aux: `aux_loss`, `z_loss` (means over layers, unscaled; 0 for dense models) and, for MoE,
    `expert_load` [n_layers, E], `router_entropy`, `dropped_fraction` (means over layers).
    Layer parameters are stacked on a leading "layers" axis (self.blocks) and applied with
    nnx.scan, so compile time does not grow with depth. With loss-free balancing the model state
    (not the Params) holds blocks/ffn/router_bias, a RouterBias [n_layers, E].
    """

    def __init__(self, cfg: ModelConfig, *, kernels: Kernels | None = None, rngs: nnx.Rngs):
        """kernels: the backend-specific compute every layer runs; default
        `Kernels.for_backend()`, the measured-fastest for jax's default backend."""
        kernels = kernels or Kernels.for_backend()
        self.kernels = kernels
        self.remat_policy = REMAT_POLICIES.get(cfg.remat)
        # Keep scalars, not the (unhashable) config dataclass: module statics go in the graphdef.
        self.is_moe = cfg.is_moe
        self.n_layers = cfg.n_layers
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

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYER_METADATA)
        def make_blocks(layer_rngs: nnx.Rngs) -> Block:
            return Block(cfg, kernels=kernels, rngs=layer_rngs)

        self.blocks = make_blocks(rngs)
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

        def layer(block: Block, x: jax.Array, pos: jax.Array, seg: jax.Array, rng: jax.Array | None):
            x, stats = block(x, pos, seg, rng, capture_routing)
            return constrain(x, RESIDUAL), stats

        if self.remat != "none":
            # Checkpoint each layer inside the scan; prevent_cse is unnecessary under scan.
            layer = nnx.remat(layer, policy=self.remat_policy, prevent_cse=False)

        @nnx.scan(in_axes=(nnx.Carry, 0, None, None, 0), out_axes=(nnx.Carry, 0),
                  transform_metadata=LAYER_METADATA, unroll=self.scan_unroll)
        def run_layers(x: jax.Array, block: Block, pos: jax.Array, seg: jax.Array, rng: jax.Array | None):
            return layer(block, x, pos, seg, rng)

        x, stats = run_layers(x, self.blocks, positions, segment_ids, layer_rngs)  # stats: [n_layers, ...]
        return ModelOutput(self._head(x).astype(jnp.float32), self._aux(stats, capture_routing))

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
        x = self.final_norm(x)
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

        @nnx.scan(in_axes=(nnx.Carry, 0, None, 0), out_axes=(nnx.Carry, 0),
                  transform_metadata=LAYER_METADATA, unroll=self.scan_unroll)
        def run_layers(x: jax.Array, block: Block, pos: jax.Array, layer_cache: KVCache):
            return block.decode(x, pos, layer_cache)

        x, cache = run_layers(x, self.blocks, positions, cache)
        return self._head(x).astype(jnp.float32), cache
