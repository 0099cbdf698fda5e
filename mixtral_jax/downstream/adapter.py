"""`MixtralLM`: our model as an lm-eval-harness language model (`lm_eval.api.model.LM`).

Subclasses lm-eval's `TemplateLM`, so requests are split into context and continuation tokens
by the library's own code (trailing context spaces moved to the continuation, the whole encoded
and the context's tokens cut off; an empty context becomes the BOS token), exactly as its HF
backend (`HFLM`) does. Tokenization matches HFLM on an `export-hf` directory: our SentencePiece
model with BOS first (as a Mistral tokenizer's `encode` adds it) unless `add_special_tokens`
says otherwise.

Scoring runs in a few fixed shapes (batching.py): requests whose model input is identical
(multiple choice with one-token answers) share one pass; inputs, longest first, are packed as
separate documents into `batch_size` rows of a power-of-two length, so a task compiles one or
two programs and computes little padding. Only the continuation tokens' log-probabilities and
greedy flags come back from the device. Generation is greedy with the KV cache: left-padded
prompts (the pads left out of the cache) prefilled in one call, then one compiled step per token
for the whole batch, stopping each row at EOS, a stop sequence or `max_gen_toks`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from mixtral_jax.config import ModelConfig
from mixtral_jax.data.tokenizer import Tokenizer
from mixtral_jax.downstream.batching import HEAD_SHARES, Group, batches, group_inputs, pack, power_of_two, rows_for
from mixtral_jax.downstream.scoring import Programs, Scores
from mixtral_jax.models.transformer import Transformer

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_BATCH_TOKENS = 32768  # rows x padded length per batch: bounds the [B, T, vocab] logits
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task gives none


def scoring_model(model: Transformer, model_cfg: ModelConfig | None) -> Transformer:
    """The model to score with: `model` itself, except that capacity dispatch becomes dropless
    (same weights), so no token is dropped and a request's score does not depend on which
    requests share its batch, as in the HF model."""
    if model_cfg is None or not model_cfg.is_moe or model_cfg.moe.dispatch != "capacity":
        return model
    cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(model_cfg.moe, dispatch="dropless"))
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, kernels=model.kernels, rngs=nnx.Rngs(0))))[0]
    return nnx.merge(graphdef, nnx.state(model))


class MixtralLM(TemplateLM):
    """lm-eval's view of a mixtral_jax model.

    model: a Transformer with its weights (`training.evaluate.load_run_model`, or a training
    state merged into one); tokenizer: the run's SentencePiece model. batch_size: rows per
    device batch (fewer for long buckets: at most `max_batch_tokens` padded tokens per batch).
    max_length: the context (default the model's max_seq_len, what HF reads from
    max_position_embeddings). model_cfg: the run's model config, to score capacity-dispatch
    MoE runs dropless. mesh: the mesh a sharded state lives on (training)."""

    backend = "causal"

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool = True,
                 model_cfg: ModelConfig | None = None, mesh: Mesh | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sp = tokenizer
        self.programs = Programs(scoring_model(model, model_cfg), mesh)
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self._max_length = int(max_length or model.max_seq_len)
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.sp.bos_id  # HFLM: the tokenizer's BOS

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return f"mixtral_jax-sentencepiece-{self.sp.fingerprint}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids, BOS first unless add_special_tokens is False (or add_bos_token is, when it
        is None). As in HFLM, a string that already starts with the BOS text "<s>" gets no BOS
        added; the text itself is encoded as text (sentencepiece, like the exported tokenizer,
        never reads control pieces from text)."""
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if add_special_tokens is None and string.startswith(self.sp.id_to_piece(self.sp.bos_id)):
            add = False
        ids = ([self.sp.bos_id] if add else []) + self.sp.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.sp.decode(tokens)  # BOS / EOS are control pieces: decoded as nothing

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding yields it) per (key, context
        tokens, continuation tokens), the sum over the continuation's tokens with the context
        cut from the left to fit max_length, as HFLM computes it."""
        inputs, last, spans = [], [], []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            inputs.append(whole[:-1] if continuation else [])
            last.append(whole[-1])
            spans.append(len(continuation))
        answers: list[tuple[float, bool]] = [(0.0, True)] * len(requests)  # an empty continuation
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Scoring (mixtral_jax)")
        groups = group_inputs(inputs, spans)
        for share in HEAD_SHARES:  # groups needing logits at <= 1/4, 1/2, all of their positions apart
            part = [g for g in groups if g.head_share == share]
            for length, rows in pack(part, self.max_length, self.batch_size, self.max_batch_tokens):
                scores, placed = self._score_rows(length, length // share, rows, last)
                for b, first, group in placed:
                    shared = group.head - 1
                    for k, member in enumerate(group.members):
                        own = slice(first + shared - (spans[member] - 1), first + shared)
                        mine = first + shared + k
                        logprob = float(np.sum(scores.logprob[b, own], dtype=np.float64) + scores.logprob[b, mine])
                        answers[member] = (logprob, bool(scores.greedy[b, own].all() and scores.greedy[b, mine]))
                    bar.update(len(group.members))
        bar.close()
        for (key, _, _), answer in zip(requests, answers):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def _score_rows(self, length: int, heads: int, rows: list[list[Group]], last: list[int]
                    ) -> tuple[Scores, list[tuple[int, int, Group]]]:
        """One device batch: `rows` of groups packed as separate documents into rows of `length`
        tokens, logits at `heads` positions per row. Returns the scores and, per group, its row
        and first query: its head - 1 shared queries (the continuation tokens inside the input),
        then one per member (its last token, after the input)."""
        n_rows = rows_for(length, self.batch_size, self.max_batch_tokens)
        tokens = np.full((n_rows, length), self.sp.pad_id, np.int32)
        positions = np.zeros((n_rows, length), np.int32)
        segments = np.zeros((n_rows, length), np.int32)  # 0: padding
        head_pos = np.zeros((n_rows, heads), np.int32)
        q_idx = np.zeros((n_rows, 4 * heads), np.int32)  # group_inputs keeps a row's queries within 4x
        q_tok = np.zeros((n_rows, 4 * heads), np.int32)
        placed = []
        for b, row in enumerate(rows):
            offset = used = queries = 0
            for segment, group in enumerate(row, start=1):
                n, h = len(group.inputs), group.head
                tokens[b, offset:offset + n] = group.inputs
                positions[b, offset:offset + n] = np.arange(n)
                segments[b, offset:offset + n] = segment
                head_pos[b, used:used + h] = offset + np.arange(n - h, n)
                targets = [(used + i, group.inputs[n - h + i + 1]) for i in range(h - 1)]
                targets += [(used + h - 1, last[m]) for m in group.members]
                q_idx[b, queries:queries + len(targets)], q_tok[b, queries:queries + len(targets)] = zip(*targets)
                placed.append((b, queries, group))
                offset, used, queries = offset + n, used + h, queries + len(targets)
        return self.programs.score(tokens, positions, segments, head_pos, q_idx, q_tok), placed

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each string's whole log-likelihood in disjoint windows of up to max_length tokens,
        each window with as much context as fits (lm-eval's rolling windows, as HFLM builds
        them: the string encoded with BOS, the first window after the prefix token)."""
        windows: list[tuple[None, list[int], list[int]]] = []
        counts = []
        for (string,) in [req.args for req in requests]:
            rolling = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                         prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            pairs = [lm_utils.make_disjoint_window(pair) for pair in rolling]
            windows += [(None, context, continuation) for context, continuation in pairs]
            counts.append(len(pairs))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        out, start = [], 0
        for req, count in zip(requests, counts):
            total = sum(logprob for logprob, _ in scores[start:start + count])
            start += count
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut at the first stop sequence (`until`) and at EOS, at most
        `max_gen_toks` tokens; prompts cut from the left to max_length - max_gen_toks (HFLM)."""
        order = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                         group_by="gen_kwargs", group_fn=lambda r: r[1])
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Generating (mixtral_jax)")
        out: list[str] = []
        for group in order.get_batched(n=0):  # one group per distinct gen_kwargs, longest first
            gen_kwargs = group[0][1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ValueError(f"mixtral_jax's lm-eval adapter decodes greedily; a task asks to sample "
                                 f"({gen_kwargs})")
            until = handle_stop_sequences(kwargs.pop("until", None), eos=self.sp.id_to_piece(self.eot_token_id))
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_context = self.max_length - max_gen
            if max_context <= 0:
                raise ValueError(f"max_gen_toks ({max_gen}) must be less than the model's context ({self.max_length})")
            prompts = [self.tok_encode(context, left_truncate_len=max_context) for context, _ in group]
            for length, n_rows, batch in batches(list(range(len(group))), [len(p) for p in prompts], max_context,
                                                 self.batch_size, self.max_batch_tokens):
                for index, text in zip(batch, self._generate([prompts[i] for i in batch], length, n_rows, max_gen, until)):
                    out.append(postprocess_generated_text(text, until, None))
                    self.cache_hook.add_partial("generate_until", group[index], out[-1])
                bar.update(len(batch))
        bar.close()
        return order.get_original(out)

    def _generate(self, prompts: list[list[int]], length: int, n_rows: int, max_gen: int,
                  until: list[str]) -> list[str]:
        """Greedy decoding of up to n_rows prompts (each at most `length` tokens) in one batch;
        the decoded new text of each, untrimmed."""
        tokens = np.full((n_rows, length), self.sp.pad_id, np.int32)
        positions = np.full((n_rows, length), -1, np.int32)  # pads: empty cache slots, masked everywhere
        lengths = np.ones((n_rows,), np.int32)
        tokens[:, -1] = self.sp.bos_id  # spare rows: a one-token prompt, never read
        positions[:, -1] = 0
        for i, prompt in enumerate(prompts):
            tokens[i, length - len(prompt):] = prompt
            positions[i, length - len(prompt):] = np.arange(len(prompt))
            lengths[i] = len(prompt)
        # A power-of-two cache, so tasks asking for different max_gen_toks share programs.
        token, cache = self.programs.prefill(tokens, positions, power_of_two(length + max_gen))
        stops = [s for s in until if s]
        new: list[list[int]] = [[] for _ in prompts]
        active = set(range(len(prompts)))
        position = lengths.copy()
        while active:
            host = np.asarray(token)
            for i in sorted(active):
                new[i].append(int(host[i]))
                if (new[i][-1] == self.eot_token_id or len(new[i]) >= max_gen
                        or (stops and any(s in self.tok_decode(new[i]) for s in stops))):
                    active.discard(i)
            if not active:
                break
            token, cache = self.programs.step(token, position, cache)
            position = position + 1
        return [self.tok_decode(ids) for ids in new]

    def get_model_info(self) -> dict:
        """What lm-eval records of the model in its results' config."""
        return {"model_num_parameters": int(sum(np.size(x) for x in jax.tree.leaves(self.programs.state)))}
