"""The tokenizer `export-hf` writes beside the weights: tokenizer.model plus a tokenizer.json and
tokenizer_config.json that `transformers.AutoTokenizer` loads and that encode exactly as our
sentencepiece tokenizer (built as plain JSON from the sentencepiece model's own settings, so
exporting needs neither transformers nor tokenizers)."""

from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_CONTROL, _PIECE_USER, _PIECE_UNUSED, _PIECE_BYTE = 1, 2, 3, 4, 5, 6
_SPM_BPE = 2


def _replace(pattern: str, content: str, regex: bool = False) -> dict[str, Any]:
    return {"type": "Replace", "pattern": {"Regex" if regex else "String": pattern}, "content": content}


def _added_token(token_id: int, content: str) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _spm_proto(model_proto: bytes) -> Any:
    """The parsed sentencepiece ModelProto (its normalizer and trainer specs are not exposed by
    the processor); ValueError if the bytes are not one."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_proto)
    except DecodeError as err:
        raise ValueError(f"not a sentencepiece model ({err})") from None
    if not proto.pieces:
        raise ValueError("not a sentencepiece model (no pieces)")
    return proto


def tokenizer_json(model_proto: bytes) -> dict[str, Any]:
    """The `tokenizer.json` (Hugging Face `tokenizers` format) that encodes and decodes exactly as
    `sentencepiece.SentencePieceProcessor.encode` / `decode` do with this BPE model.

    Built from the model's own settings, as transformers' converter
    (`SpmConverter.build_tokenizer_from_spm_proto`) does, but as plain JSON, so exporting needs
    neither transformers nor tokenizers:
    - normalizer, in SentencePiece's order: the precompiled character map (none for ours:
      identity), extra-space removal if the model does it (ours does not), spaces -> "▁", and
      the dummy "▁" prefix only if the model adds one (Mistral's does, ours does not);
    - model: BPE over the same ids, one merge per (left, right) split of every normal piece into two
      normal pieces, ranked by the piece's score (SentencePiece merges the best-scoring pair first),
      byte fallback as the model has it;
    - user-defined pieces are isolated before BPE (SentencePiece emits them whole);
    - control pieces (unk, <s>, </s>, ...) are special added tokens, never produced from text;
    - post-processor: BOS before the text (`add_special_tokens=False` leaves it out);
    - decoder: "▁" -> space, byte pieces -> bytes, the dummy prefix stripped if there is one.
    ValueError for bytes that are not a sentencepiece model, or a model that is not BPE.
    """
    proto = _spm_proto(model_proto)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != _SPM_BPE:
        raise ValueError(f"only BPE sentencepiece models are exported as tokenizer.json "
                         f"(this one has model_type {trainer.model_type})")
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == _PIECE_NORMAL}
    ranked = sorted((-score, index, piece[:cut], piece[cut:])
                    for piece, (score, index) in normal.items()
                    for cut in range(1, len(piece)) if piece[:cut] in normal and piece[cut:] in normal)
    user_defined = [p.piece for p in pieces if p.type == _PIECE_USER]
    unk_id = next((i for i, p in enumerate(pieces) if p.type == _PIECE_UNKNOWN), trainer.unk_id)

    normalizers: list[dict[str, Any]] = []
    if norm.precompiled_charsmap:
        normalizers.append({"type": "Precompiled",
                            "precompiled_charsmap": base64.b64encode(norm.precompiled_charsmap).decode()})
    if norm.remove_extra_whitespaces:  # SentencePiece collapses spaces only, not newlines or tabs
        normalizers += [_replace(r"\A +| +\z", "", regex=True), _replace(" {2,}", " ", regex=True)]
    if norm.escape_whitespaces:
        normalizers.append(_replace(" ", "\u2581"))
    if norm.add_dummy_prefix:  # prepended to any non-empty text, even one that starts with a space
        normalizers.append({"type": "Prepend", "prepend": "\u2581"})
    pre_tokenizer = None
    if user_defined:
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre_tokenizer = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}

    post_processor = None
    if 0 <= trainer.bos_id < len(pieces):
        bos = pieces[trainer.bos_id].piece
        post_processor = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [trainer.bos_id], "tokens": [bos]}},
        }
    decoders: list[dict[str, Any]] = [_replace("\u2581", " ")]
    if trainer.byte_fallback:
        decoders.append({"type": "ByteFallback"})
    decoders.append({"type": "Fuse"})
    if norm.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})

    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [_added_token(i, p.piece) for i, p in enumerate(pieces)
                         if p.type in (_PIECE_UNKNOWN, _PIECE_CONTROL)],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[unk_id].piece,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": bool(trainer.byte_fallback), "ignore_merges": bool(user_defined),
                  "vocab": vocab, "merges": [[left, right] for _, _, left, right in ranked]},
    }


def save_tokenizer(model_file: str | Path, path: str | Path, model_max_length: int | None = None) -> list[Path]:
    """Write a sentencepiece BPE model as a tokenizer `transformers.AutoTokenizer.from_pretrained(path)`
    loads and that encodes exactly as `Tokenizer.encode` (sentencepiece) does: `tokenizer.model`
    (the model itself), `tokenizer.json` (see `tokenizer_json`) and `tokenizer_config.json`.

    Conventions, as Mistral's HF tokenizers: `tokenizer(text)` puts BOS first (what training puts
    before every document) and no EOS; `tokenizer(text, add_special_tokens=False)` is exactly
    `encode(text)`. The pad token is the unk piece (id 0; we have no pad piece). Special-token
    strings in the text ("<s>", "</s>", "<unk>") are encoded as text, as sentencepiece does
    (`split_special_tokens`). The class is `PreTrainedTokenizerFast`: it reads tokenizer.json
    as written, in transformers 4 and 5 (5 maps it to `TokenizersBackend`); LlamaTokenizer
    classes would rebuild the pipeline with a dummy-prefix setting of their own.

    Returns the files written. A file that is not a sentencepiece BPE model is copied as
    `tokenizer.model` only, with a warning: nothing else is known to reproduce it exactly."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_proto = Path(model_file).read_bytes()
    (path / "tokenizer.model").write_bytes(model_proto)
    try:
        spec = tokenizer_json(model_proto)
    except ValueError as err:
        logging.getLogger(__name__).warning("%s: wrote tokenizer.model only (%s)", path, err)
        return [path / "tokenizer.model"]
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")

    proto = _spm_proto(model_proto)
    trainer, pieces = proto.trainer_spec, proto.pieces

    def piece(token_id: int) -> str | None:
        return pieces[token_id].piece if 0 <= token_id < len(pieces) else None

    unk = next((p.piece for p in pieces if p.type == _PIECE_UNKNOWN), piece(trainer.unk_id))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(trainer.bos_id), "eos_token": piece(trainer.eos_id), "unk_token": unk,
        "pad_token": piece(trainer.pad_id) or unk,
        "add_bos_token": piece(trainer.bos_id) is not None, "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length) if model_max_length else int(1e30),
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return [path / name for name in TOKENIZER_FILES]
