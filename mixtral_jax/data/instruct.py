"""Instruction-tuning data: the `instruct:PATH` source and the Mistral instruct template.

Records (one JSON object per line of a file or glob):
  {"prompt": str, "response": str, "system": str (optional)}
  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
The messages alternate user / assistant after an optional leading system message and end
with an assistant message. A parsed record is a *conversation*: a tuple of (role, content)
pairs (tuples, so it hashes, pickles to grain workers and is cheap to keep in memory).

Template (v1, as Mistral-7B-Instruct / Mixtral-8x7B-Instruct use), token by token:
  BOS [INST] " {user} " [/INST] " {assistant}" EOS [INST] " {user2} " [/INST] " {assistant2}" EOS
A system message is prepended to the first user message followed by a blank line
("{system}\n\n{user}"). [INST] / [/INST] are their own piece ids when the vocabulary has
them as single pieces, else their encoded text. Every quoted part is encoded on its own, so
`decode` of the ids (BOS / EOS dropped) is exactly "[INST] {user} [/INST] {assistant}..."
and the assistant tokens never merge with prompt text: the loss mask is exactly 1 on the
assistant tokens and their EOS, 0 on BOS, [INST] ... [/INST] and the user / system text.
With a tokenizer that adds a dummy "▁" prefix to each encode (Mistral's tokenizer.model)
the quoted parts are encoded without their outer spaces, which the prefix supplies: the
ids are then those of mistral-common's v1 encoder (encode("[INST] {user} [/INST]") then
encode("{assistant}") + EOS per turn).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # runtime import would be circular: tokenizer -> corpus -> instruct
    from mixtral_jax.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

INST, END_INST = "[INST]", "[/INST]"
ROLES = ("system", "user", "assistant")
Conversation = tuple[tuple[str, str], ...]
Document = Union[str, Conversation]


# ---------------------------------------------------------------- validation / parsing


def check_turns(turns: Sequence[tuple[str, str]], *, open_end: bool = False) -> str | None:
    """Why `turns` is not a valid conversation, or None if it is. `open_end` allows ending
    on a user turn (a generation prompt) instead of an assistant turn."""
    if not turns:
        return "no messages"
    for index, turn in enumerate(turns):
        if not (isinstance(turn, (tuple, list)) and len(turn) == 2):
            return f"message {index} is not a (role, content) pair"
        role, content = turn
        if role not in ROLES:
            return f"message {index} has unknown role {role!r}"
        if not isinstance(content, str):
            return f"message {index} content is {type(content).__name__}, not a string"
    start = 1 if turns[0][0] == "system" else 0
    body = turns[start:]
    if not body:
        return "no user message"
    for index, (role, content) in enumerate(body, start):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        if role != expected:
            return f"message {index} has role {role!r}, expected {expected!r}"
        if not content.strip():  # an empty turn teaches nothing and usually means bad data
            return f"message {index} ({role}) is empty"
    if body[-1][0] != "assistant" and not open_end:
        return "does not end with an assistant message"
    return None


def parse_record(record: Any) -> tuple[Conversation | None, str]:
    """A decoded JSON line -> (conversation, "") or (None, reason it is unusable)."""
    if not isinstance(record, dict):
        return None, f"not a JSON object ({type(record).__name__})"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            return None, "'messages' is not a list"
        turns = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                return None, f"message {index} is not an object with 'role' and 'content'"
            turns.append((message["role"], message["content"]))
    elif "prompt" in record and "response" in record:
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            return None, f"'system' is {type(system).__name__}, not a string"
        turns = [("user", record["prompt"]), ("assistant", record["response"])]
        if system and system.strip():  # an empty system prompt is the same as none
            turns.insert(0, ("system", system))
    else:
        return None, "neither 'messages' nor 'prompt' and 'response'"
    reason = check_turns(turns)
    if reason:
        return None, reason
    return tuple((str(role), str(content)) for role, content in turns), ""


def read_instruct_jsonl(pattern: str) -> list[Conversation]:
    """Every usable conversation in the JSON-lines file(s) `pattern` (a path or glob).

    Unusable lines are skipped and counted in one warning (with the first one's location
    and reason); ValueError if there is no such file or nothing usable in it."""
    paths = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise ValueError(f"data.source 'instruct:{pattern}': no such file")
    conversations: list[Conversation] = []
    skipped, first_bad = 0, ""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) are not records
                try:
                    conversation, reason = parse_record(json.loads(line))
                except json.JSONDecodeError as err:
                    conversation, reason = None, f"invalid JSON ({err.msg})"
                if conversation is None:
                    skipped += 1
                    first_bad = first_bad or f"{path}:{number}: {reason}"
                    continue
                conversations.append(conversation)
    if not conversations:
        raise ValueError(f"data.source 'instruct:{pattern}': no usable conversations in "
                         f"{', '.join(paths)} ({skipped} line(s) skipped; first: {first_bad})")
    if skipped:
        log.warning("instruct:%s: skipped %d unusable line(s); first at %s", pattern, skipped, first_bad)
    return conversations


def conversation_key(conversation: Conversation) -> str:
    """Canonical text of a conversation for the content-hash train / validation split."""
    return json.dumps([list(turn) for turn in conversation], ensure_ascii=False, separators=(",", ":"))


def render_text(document: Document) -> str:
    """A document as plain text: a string as is, a conversation as its template text
    (e.g. for training a tokenizer, which then learns the [INST] markers' merges)."""
    if isinstance(document, str):
        return document
    return "".join(text for _, text in _text_parts(_merge_system(document)))


# ---------------------------------------------------------------- template


def _merge_system(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Fold a leading system message into the first user message, as Mistral v1 does."""
    turns = [tuple(t) for t in turns]
    if turns and turns[0][0] == "system":
        system, rest = turns[0][1], turns[1:]
        if rest:
            rest[0] = ("user", f"{system}\n\n{rest[0][1]}")
        return rest
    return turns


def _text_parts(turns: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(kind, text) pieces between BOS and the EOS ids, system already merged; kind is
    "marker" ([INST] / [/INST]), "prompt" (user text) or "answer" (assistant text)."""
    parts: list[tuple[str, str]] = []
    for role, content in turns:
        if role == "user":
            parts += [("marker", INST), ("prompt", f" {content} "), ("marker", END_INST)]
        else:
            parts.append(("answer", f" {content}"))
    return parts


def _marker_ids(tokenizer: "Tokenizer", marker: str) -> list[int]:
    """A template marker's ids: its own piece if the vocabulary has it, else its text. A
    tokenizer without `piece_id` (e.g. a test stand-in) always encodes the text."""
    piece_id = getattr(tokenizer, "piece_id", None)
    single = piece_id(marker) if piece_id is not None else None
    return [single] if single is not None else list(tokenizer.encode(marker))


def _encode(tokenizer: "Tokenizer", turns: Sequence[tuple[str, str]],
            open_end: bool) -> tuple[list[int], list[float]]:
    reason = check_turns(turns, open_end=open_end)
    if reason:
        raise ValueError(f"not a valid conversation: {reason}")
    markers = {m: _marker_ids(tokenizer, m) for m in (INST, END_INST)}
    # A tokenizer that prepends "▁" to every encode (Mistral's own) supplies the template's
    # spaces itself; dropping them gives mistral-common's tokens ("▁What", not "▁▁What").
    dummy_prefix = bool(getattr(tokenizer, "adds_dummy_prefix", False))
    ids, mask = [tokenizer.bos_id], [0.0]
    for kind, text in _text_parts(_merge_system(turns)):
        if dummy_prefix and kind != "marker":
            text = text[1:-1] if kind == "prompt" else text[1:]
        piece = markers[text] if kind == "marker" else list(tokenizer.encode(text))
        if kind == "answer":
            piece = piece + [tokenizer.eos_id]  # the model learns to stop after its answer
        ids += piece
        mask += [float(kind == "answer")] * len(piece)
    return ids, mask


def encode_conversation(tokenizer: "Tokenizer",
                        turns: Sequence[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) of a conversation in the Mistral instruct template, and a float32
    mask that is 1 exactly on the tokens to learn: each assistant turn and its EOS."""
    ids, mask = _encode(tokenizer, turns, open_end=False)
    return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def chat_prompt_ids(tokenizer: "Tokenizer", user_text: str, system: str | None = None) -> list[int]:
    """BOS [INST] " {system}\\n\\n{user} " [/INST]: the prompt to generate a reply from
    (the model should continue with " {answer}" EOS, as in training)."""
    turns = ([("system", system)] if system and system.strip() else []) + [("user", user_text)]
    return _encode(tokenizer, turns, open_end=True)[0]


def encode_document(tokenizer: "Tokenizer", document: Document) -> np.ndarray | dict[str, np.ndarray]:
    """Pipeline encoder: text -> int32 [BOS, ..., EOS] (every token a target); conversation
    -> {"tokens", "target_mask"} (bool: is the token a target); a document from a token cache
    (already encoded: an array, or that dict) as it is."""
    if isinstance(document, (np.ndarray, dict)):
        return document
    if isinstance(document, str):
        return np.asarray([tokenizer.bos_id, *tokenizer.encode(document), tokenizer.eos_id], np.int32)
    ids, mask = encode_conversation(tokenizer, document)
    return {"tokens": ids, "target_mask": mask > 0}


def split_encoded(encoded: np.ndarray | dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """encode_document's output -> (tokens, target mask or None when every token is one)."""
    if isinstance(encoded, dict):
        return encoded["tokens"], np.asarray(encoded["target_mask"], bool)
    return encoded, None


def target_ids(tokenizer: "Tokenizer", document: Document) -> list[int]:
    """The tokens of a document that are loss targets (text: all but BOS; conversation:
    the assistant turns and their EOS), e.g. for held-out unigram statistics."""
    tokens, mask = split_encoded(encode_document(tokenizer, document))
    return tokens[1:].tolist() if mask is None else tokens[mask].tolist()
