"""The compiled device programs behind the lm-eval adapter: scoring padded batches of token
rows, and greedy batched generation with the KV cache.

Each program is jitted with the model's graphdef as a static argument, so it compiles once per
(model, batch shape) and is reused for every batch of that shape. `Programs` records the shapes
it has dispatched: with the adapter's length buckets, a task touches a handful of them.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mixtral_jax.models.attention import KVCache
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.parallel.mesh import traced_under


class Scores(NamedTuple):
    """A scored batch's queries, on the host: query j of row b asks for token q_tok[b, j] as the
    token after row position head_pos[b, q_idx[b, j]]."""

    logprob: np.ndarray  # [B, Q] log p(token | the row's document up to that position)
    greedy: np.ndarray  # [B, Q] whether the token is the argmax there


def _final_hidden(model: Transformer, tokens: jax.Array, positions: jax.Array, segments: jax.Array) -> jax.Array:
    """The model's normed final residual stream [B, T, dim] (its final norm's output), read with
    nnx.capture; the model's own output projection over every position is then unused, and XLA
    leaves it out of the program."""
    capture = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)
    _, captured = capture(tokens, positions=positions, segment_ids=segments)
    (hidden,) = captured["final_norm"]["__call__"].get_value()
    return hidden


def _score(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array, segments: jax.Array,
           head_pos: jax.Array, q_idx: jax.Array, q_tok: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows of packed documents [B, T] (each with its own positions and segment id; 0 = padding)
    -> the log-probability and greedy flag of every query [B, Q]. Logits are computed only at
    the H head positions per row [B, H] that queries read (the continuations' positions)."""
    model = nnx.merge(graphdef, state)
    rows = jnp.arange(tokens.shape[0])[:, None]
    logits = model.output_logits(_final_hidden(model, tokens, positions, segments)[rows, head_pos])  # [B, H, V]
    # log p = logit - logsumexp: no [B, H, V] log-softmax is materialised, only what is returned.
    norm = jax.nn.logsumexp(logits, axis=-1)  # [B, H]
    best = jnp.argmax(logits, axis=-1)  # [B, H]
    logprob = logits[rows, q_idx, q_tok] - norm[rows, q_idx]
    return logprob, best[rows, q_idx] == q_tok


def _prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, positions: jax.Array,
             cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Left-padded prompts [B, T] (pads at position -1, which the cache keeps empty) -> the
    greedy next token of every row [B] and the filled cache."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(tokens, positions, cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def _step(graphdef: nnx.GraphDef, state: nnx.State, token: jax.Array, position: jax.Array,
          cache: KVCache) -> tuple[jax.Array, KVCache]:
    """One greedy decode step: token [B] at per-row positions [B] -> the next tokens [B]."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.decode(token[:, None], position[:, None], cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


@functools.cache
def _jitted(mesh: Mesh | None) -> tuple[Any, Any, Any]:
    """The three programs jitted once per mesh (None: no mesh), so that every adapter on the
    same architecture, such as one per evaluation during training, reuses their compilations."""
    wrap = (lambda fn: traced_under(mesh, fn)) if mesh is not None else (lambda fn: fn)
    return tuple(jax.jit(wrap(fn), static_argnums=0) for fn in (_score, _prefill, _step))


class Programs:
    """The model's state and its three jitted programs. `mesh`: trace under it (a sharded
    training state: the model's layout constraints and expert-parallel dispatch need it)."""

    def __init__(self, model: Transformer, mesh: Mesh | None = None):
        self.graphdef, self.state = nnx.split(model)
        self._score, self._prefill, self._step = _jitted(mesh)
        self.shapes: set[tuple[str, tuple[int, ...]]] = set()  # (program, shape) pairs dispatched
        self.model = model

    def score(self, tokens: np.ndarray, positions: np.ndarray, segments: np.ndarray, head_pos: np.ndarray,
              q_idx: np.ndarray, q_tok: np.ndarray) -> Scores:
        self.shapes.add(("score", (*tokens.shape, head_pos.shape[1])))
        out = self._score(self.graphdef, self.state, tokens, positions, segments, head_pos, q_idx, q_tok)
        return Scores(*jax.device_get(out))

    def prefill(self, tokens: np.ndarray, positions: np.ndarray, cache_len: int) -> tuple[np.ndarray, Any]:
        self.shapes.add(("prefill", (*tokens.shape, cache_len)))
        cache = self.model.init_cache(tokens.shape[0], cache_len)
        token, cache = self._prefill(self.graphdef, self.state, tokens, positions, cache)
        return token, cache

    def step(self, token: jax.Array, position: np.ndarray, cache: Any) -> tuple[jax.Array, Any]:
        self.shapes.add(("step", (token.shape[0], int(cache.pos.shape[-1]))))
        return self._step(self.graphdef, self.state, token, position, cache)
