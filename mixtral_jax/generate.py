"""Autoregressive generation with a KV cache: sampling, the token loop, and text in / text out
for a trained run (`mixtral-jax generate`).

The prompt is prefilled in one call; every further token is one call of a decode step that is
compiled once per (model, sampling settings, cache size) and reused across calls and prompts.
Under a sliding window the cache is a rolling buffer of W slots, so memory stays constant
however long the generation runs.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mixtral_jax.data.instruct import chat_prompt_ids
from mixtral_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer
from mixtral_jax.models.attention import KVCache
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.training.evaluate import load_run_model


def sample_next(logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Next-token ids [B] from logits [B, V].

    temperature <= 0: greedy argmax (key unused). Otherwise the logits are divided by temperature,
    then top_k > 0 keeps the k highest, then top_p < 1 keeps the nucleus: the smallest set of
    most probable tokens whose probability reaches top_p (never empty), and one token is drawn.
    The settings are Python numbers, so each combination traces to its own simple program.
    """
    logits = logits.astype(jnp.float32)
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    rows = jnp.arange(logits.shape[0])[:, None]
    if 0 < top_k < logits.shape[-1]:
        # Keep exactly the top_k indices (not "value >= k-th value"), so ties cannot widen the set.
        _, keep_idx = jax.lax.top_k(logits, top_k)
        keep = jnp.zeros(logits.shape, bool).at[rows, keep_idx].set(True)
        logits = jnp.where(keep, logits, -jnp.inf)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
        # A token is in the nucleus when the mass strictly before it is still short of top_p;
        # the most probable token always is, so the set is never empty even for top_p <= 0.
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = (mass_before < top_p).at[:, 0].set(True)
        keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------- compiled steps
# graphdef and the sampling settings are static (hashable), so the compiled programs are cached
# by jax.jit across generate() calls on the same architecture.


def _prefill(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, cache: KVCache, key: jax.Array,
             temperature: float, top_k: int, top_p: float) -> tuple[jax.Array, KVCache]:
    """Run the whole prompt [B, T] through the cache; sample the token after it."""
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, cache = model.decode(tokens, positions, cache)
    return sample_next(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k, top_p), cache


def _step(graphdef: nnx.GraphDef, state: nnx.State, token: jax.Array, position: jax.Array, cache: KVCache,
          key: jax.Array, temperature: float, top_k: int, top_p: float) -> tuple[jax.Array, KVCache]:
    """One decode step: token [B] at scalar `position` -> (the next token [B], the new cache)."""
    model = nnx.merge(graphdef, state)
    positions = jnp.full((token.shape[0], 1), position, jnp.int32)
    logits, cache = model.decode(token[:, None], positions, cache)
    # A fresh key per position, derived in the program so the host passes only the scalar.
    return sample_next(logits[:, -1], jax.random.fold_in(key, position), temperature, top_k, top_p), cache


_SAMPLING = ("graphdef", "temperature", "top_k", "top_p")
_prefill_jit = jax.jit(_prefill, static_argnames=_SAMPLING)


@functools.cache
def _step_jit(donate: bool) -> Any:
    # Donating the cache lets XLA update it in place on accelerators; the CPU backend cannot
    # use donated buffers and would only warn on every call, so it is not asked to there.
    return jax.jit(_step, static_argnames=_SAMPLING, donate_argnames=("cache",) if donate else ())


def cache_length(model: Transformer, prompt_len: int, max_new_tokens: int, max_len: int | None = None) -> int:
    """Positions the generation may use: prompt + new tokens, or `max_len` when given (a fixed
    size lets calls with different lengths share one compiled step). Raises ValueError when the
    request does not fit, or when a model without a sliding window would need a cache longer
    than its max_seq_len (positions it was never trained on, and memory growing with length)."""
    needed = prompt_len + max_new_tokens
    length = needed if max_len is None else max_len
    if needed > length:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {needed} "
                         f"exceeds max_len ({max_len})")
    if model.sliding_window is None and length > model.max_seq_len:
        raise ValueError(f"a cache of {length} positions (prompt {prompt_len} + max_new_tokens "
                         f"{max_new_tokens}{'' if max_len is None else f', max_len {max_len}'}) exceeds "
                         f"the model's max_seq_len ({model.max_seq_len}); this model has no sliding "
                         f"window, so shorten the prompt or ask for fewer tokens")
    return length


def generate(
    model: Transformer,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int = 0,
    max_len: int | None = None,
) -> list[int]:
    """The new token ids after `prompt_ids`: up to max_new_tokens, ending early right after
    eos_id (which is included). Greedy at temperature 0; see sample_next for the rest.

    Without a sliding window the cache holds prompt + max_new_tokens positions (or max_len) and
    must fit the model's max_seq_len; with one it holds W slots, whatever the length.
    """
    if not prompt_ids:
        raise ValueError("generate needs a non-empty prompt (start it with the BOS id)")
    if max_new_tokens < 0 or top_k < 0 or not 0 < top_p <= 1 or temperature < 0:
        raise ValueError(f"need max_new_tokens >= 0, temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                         f"{max_new_tokens}, {temperature}, {top_k}, {top_p}")
    if max_new_tokens == 0:
        return []
    length = cache_length(model, len(prompt_ids), max_new_tokens, max_len)
    graphdef, state = nnx.split(model)
    settings = dict(graphdef=graphdef, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    key = jax.random.key(seed)
    cache = model.init_cache(1, length)
    step = _step_jit(jax.default_backend() != "cpu")

    tokens = jnp.asarray([list(prompt_ids)], jnp.int32)
    token, cache = _prefill_jit(state=state, tokens=tokens, cache=cache, key=key, **settings)
    out: list[int] = []
    position = len(prompt_ids)
    while True:
        out.append(int(token[0]))  # the host needs each token anyway to check for eos
        if out[-1] == eos_id or len(out) == max_new_tokens:
            return out
        token, cache = step(state=state, token=token, position=jnp.int32(position), cache=cache, key=key,
                            **settings)
        position += 1


def load_tokenizer(run_dir: Path, cfg: Any) -> Tokenizer:
    """The run's own tokenizer.model if it saved one, else the (cached) one its data config names."""
    saved = run_dir / "tokenizer.model"
    if saved.is_file():
        return Tokenizer.from_file(saved)
    return load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)


def generate_text(
    run_dir: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    prompt_ids: Sequence[int] | None = None,
    chat: bool = False,
    system: str | None = None,
) -> str:
    """Continue `prompt` with a run's latest checkpoint and return only the new text.

    The prompt is encoded as [BOS] + tokens; with chat=True it is the user message of the
    Mistral instruct template (after an optional system message); prompt_ids, when given, are
    used as is. Generation stops at the tokenizer's EOS, which is not part of the returned text.
    """
    run_dir = Path(run_dir)
    model, cfg, _ = load_run_model(run_dir)
    tokenizer = load_tokenizer(run_dir, cfg)
    if prompt_ids is not None:
        ids = list(prompt_ids)
    elif chat:  # the prompt is the user message of a Mistral instruct conversation
        ids = chat_prompt_ids(tokenizer, prompt, system=system)
    else:
        ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    new = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, eos_id=tokenizer.eos_id, seed=seed)
    if new and new[-1] == tokenizer.eos_id:
        new = new[:-1]
    return tokenizer.decode(new)
