"""Validation of a loaded Config: every value finite and in range, choices spelled right,
cross-field rules (heads, windows, sequence lengths, fine-tuning options, mesh), each failure a
one-line ConfigError naming the key (and the closest valid value where one is close)."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterator

from mixtral_jax.config.choices import CHOICE_KEYS, LORA_TARGETS, parse_source
from mixtral_jax.config.errors import ConfigError, require_choice
from mixtral_jax.config.schema import Config, DataConfig, ModelConfig
from mixtral_jax.hardware import HARDWARE_CHOICES

# JAX's default integer is int32 (shapes, token ids, step counters): bigger values would
# overflow long after validation, so they stop here. grain takes seeds up to 2**32 - 1.
_INT_LIMIT = 2**31 - 1
_INT_LIMITS = {"run.seed": 2**32 - 1, "data.tokenizer.train_bytes": 2**53}
# Single-field ranges: every float is also required to be finite (NaN fails no `>` test by
# itself when the check is written as `not x < 0`, and inf passes `> 0`).
_POSITIVE = (
    "model.vocab_size", "model.dim", "model.n_layers", "model.n_heads", "model.n_kv_heads",
    "model.hidden_dim", "model.max_seq_len", "model.norm_eps", "model.rope_theta", "model.moe.capacity_factor",
    "data.seq_len", "data.batch_size", "data.tokenizer.train_bytes", "optim.lr", "optim.eps", "train.steps",
    "train.eval_every", "train.log_every", "train.checkpoint_every", "optim.grad_accum", "train.keep_checkpoints",
    "train.max_consecutive_nonfinite", "mesh.dcn_data", "mesh.dcn_fsdp", "mesh.dcn_expert", "mesh.dcn_tensor")
_NON_NEGATIVE = (
    "run.seed", "model.moe.num_experts", "model.moe.aux_loss_coef", "model.moe.z_loss_coef",
    "model.moe.bias_update_rate", "model.moe.jitter", "data.num_workers", "data.shuffle_buffer_docs",
    "optim.warmup_steps", "optim.weight_decay", "optim.clip_norm", "train.eval_batches", "train.eval_tasks_every",
    "finetune.router_lr_scale", "finetune.lora.rank", "cost.price_per_device_hour")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-section field."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _get(cfg: Config, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), cfg)


def _check_leaves(cfg: Config) -> None:
    """Type-level sanity every field shares: finite floats, ints within int32, printable text."""
    for key, value in _leaves(cfg):
        if isinstance(value, float):
            _require(math.isfinite(value), key, f"must be a finite number, got {value}")
        elif isinstance(value, int) and not isinstance(value, bool):
            limit = _INT_LIMITS.get(key, _INT_LIMIT)
            _require(-limit <= value <= limit, key, f"{value} is out of range (at most {limit} in size)")
        elif isinstance(value, str):
            _require(value.isprintable(), key, f"must be printable text, got {value!r}")
        elif key == "data.mixture":
            continue  # a list of sections, checked by _validate_mixture
        elif isinstance(value, list) and key == "model.moe.dense_layers":
            _require(all(isinstance(v, int) and not isinstance(v, bool) for v in value), key,
                     f"must be a list of layer indices, got {value!r}")
        elif isinstance(value, list):
            _require(all(isinstance(v, str) for v in value), key, f"must be a list of names, got {value!r}")


def validate(cfg: Config) -> None:
    """Cross-field and range checks; raise ConfigError naming the offending key."""
    _check_leaves(cfg)
    for key in _POSITIVE:
        _require(_get(cfg, key) > 0, key, f"must be positive, got {_get(cfg, key)}")
    for key in _NON_NEGATIVE:
        _require(_get(cfg, key) >= 0, key, f"must be >= 0, got {_get(cfg, key)}")
    for key, registry in CHOICE_KEYS.items():
        if key != "finetune.lora.targets":  # a list, checked with the rest of LoRA (only when it is on)
            registry.check(_get(cfg, key), key)
    m, moe, d, o = cfg.model, cfg.model.moe, cfg.data, cfg.optim
    _require(m.scan_unroll == "auto" or (isinstance(m.scan_unroll, int) and not isinstance(m.scan_unroll, bool)
                                         and m.scan_unroll > 0), "model.scan_unroll",
             f"must be auto or a positive number of layers, got {m.scan_unroll!r}")
    _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
             f"n_heads ({m.n_heads}) must be a multiple of n_kv_heads ({m.n_kv_heads})")
    _require(m.sliding_window is None or m.sliding_window > 0, "model.sliding_window",
             "must be a positive number of positions, or null for full causal attention")
    if m.head_dim is None:
        _require(m.dim % m.n_heads == 0, "model.n_heads",
                 f"dim ({m.dim}) must be divisible by n_heads ({m.n_heads}) when model.head_dim is null")
    _require(m.head_dim > 0 and m.head_dim % 2 == 0, "model.head_dim",
             f"must be positive and even (RoPE rotates pairs), got {m.head_dim}")
    if moe.num_experts > 0:
        _require(1 <= moe.top_k <= moe.num_experts, "model.moe.top_k",
                 f"must be between 1 and model.moe.num_experts ({moe.num_experts}), got {moe.top_k}")
        if moe.router == "expert_choice":
            _require(moe.bias_update_rate == 0, "model.moe.bias_update_rate", "loss-free balancing biases "
                     "token-choice selection; expert_choice is balanced by construction")
        _validate_moe_shape(m)
    _require(d.seq_len <= m.max_seq_len, "data.seq_len",
             f"seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    parse_source(d.source)
    _validate_mixture(cfg)
    _require(bool(d.text_key), "data.text_key", "must name a field")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be within [0, 1]")
    _require(0 <= o.b1 < 1, "optim.b1", "must be within [0, 1)")
    _require(0 <= o.b2 < 1, "optim.b2", "must be within [0, 1)")
    _require(d.batch_size % o.grad_accum == 0, "optim.grad_accum",
             f"data.batch_size ({d.batch_size}) must be divisible by grad_accum ({o.grad_accum})")
    _validate_finetune(cfg)
    _validate_eval_tasks(cfg)
    _validate_mesh_cost(cfg)
    _require(bool(cfg.run.name) and "/" not in cfg.run.name and cfg.run.name not in (".", ".."), "run.name",
             "must be a non-empty name without '/' (and not '.' or '..')")


def _validate_mixture(cfg: Config) -> None:
    """data.mixture: named, distinct, readable sources with positive finite weights. Weights
    that do not sum to 1 are normalised by the pipeline (mixture_weights), not refused."""
    mixture, key = cfg.data.mixture, "data.mixture"
    if not mixture:
        return
    # data.source keeps its default beside a mixture (a base config may spell the default out);
    # any other value would be silently ignored, so it is refused.
    _require(cfg.data.source == DataConfig.source, "data.source",
             f"'{cfg.data.source}' is set as well as data.mixture; give the source as a mixture entry instead")
    names: set[str] = set()
    for index, entry in enumerate(mixture):
        at = f"{key}[{index}]"
        _require(isinstance(entry.name, str) and bool(entry.name.strip()), f"{at}.name", "must name the source")
        _require(entry.name.isprintable() and "/" not in entry.name and " " not in entry.name, f"{at}.name",
                 f"'{entry.name}' is a metric name suffix: no '/', spaces or control characters")
        _require(entry.name not in names, f"{at}.name", f"'{entry.name}' names two mixture sources")
        names.add(entry.name)
        _require(isinstance(entry.source, str) and bool(entry.source.strip()), f"{at}.source",
                 "is empty; give a data.source value such as jsonl:PATH")
        try:
            parse_source(entry.source)
        except ConfigError as err:
            raise ConfigError(str(err).replace("'data.source'", f"'{at}.source'", 1)) from None
        _require(isinstance(entry.weight, (int, float)) and math.isfinite(entry.weight) and entry.weight > 0,
                 f"{at}.weight", f"must be a positive number, got {entry.weight}")


def _validate_moe_shape(m: ModelConfig) -> None:
    """Expert widths, the layer pattern and group-limited routing (an MoE model only)."""
    moe = m.moe
    for key in ("expert_hidden_dim", "shared_hidden_dim"):
        value = getattr(moe, key)
        _require(value is None or value > 0, f"model.moe.{key}", f"must be positive or null, got {value}")
    _require(moe.shared_experts >= 0, "model.moe.shared_experts", f"must be >= 0, got {moe.shared_experts}")
    _require(not moe.shared_gate or moe.shared_experts > 0, "model.moe.shared_gate",
             "gates the shared experts: set model.moe.shared_experts > 0")
    _require(moe.first_dense_layers >= 0, "model.moe.first_dense_layers", f"must be >= 0, got {moe.first_dense_layers}")
    _require(moe.sparse_every >= 1, "model.moe.sparse_every", f"must be >= 1, got {moe.sparse_every}")
    bad = [i for i in moe.dense_layers if not 0 <= i < m.n_layers]
    _require(not bad, "model.moe.dense_layers", f"{bad} are not layers of a {m.n_layers}-layer model")
    _require(m.n_sparse_layers > 0, "model.moe.first_dense_layers",
             "with sparse_every and dense_layers, leaves no sparse layer; set model.moe.num_experts: 0 for a dense model")
    _require(moe.n_groups >= 1 and moe.num_experts % moe.n_groups == 0, "model.moe.n_groups",
             f"must divide model.moe.num_experts ({moe.num_experts}), got {moe.n_groups}")
    _require(1 <= moe.topk_groups <= moe.n_groups, "model.moe.topk_groups",
             f"must be between 1 and model.moe.n_groups ({moe.n_groups}), got {moe.topk_groups}")
    per_group = moe.num_experts // moe.n_groups
    _require(moe.n_groups == 1 or per_group >= 2, "model.moe.n_groups",
             "groups are scored by their two best experts: each needs at least 2")
    _require(moe.topk_groups * per_group >= moe.top_k, "model.moe.topk_groups",
             f"{moe.topk_groups} groups of {per_group} experts hold fewer than top_k ({moe.top_k})")
    _require(moe.routed_scaling > 0, "model.moe.routed_scaling", f"must be positive, got {moe.routed_scaling}")
    _require(moe.n_groups == 1 or moe.router in ("softmax_topk", "sigmoid_topk"), "model.moe.n_groups",
             f"group-limited routing needs router softmax_topk or sigmoid_topk, not {moe.router}")


def _validate_eval_tasks(cfg: Config) -> None:
    """train.eval_tasks*: names present and settings in range (the names themselves are resolved
    against lm-eval's task index when training starts, before the first step)."""
    t = cfg.train
    _require(all(name.strip() and "," not in name for name in t.eval_tasks), "train.eval_tasks",
             f"must be a list of task names (one per item), got {t.eval_tasks!r}")
    _require(t.eval_tasks_limit is None or t.eval_tasks_limit > 0, "train.eval_tasks_limit",
             f"must be positive or null, got {t.eval_tasks_limit}")
    _require(t.eval_tasks_num_fewshot is None or t.eval_tasks_num_fewshot >= 0, "train.eval_tasks_num_fewshot",
             f"must be >= 0 or null, got {t.eval_tasks_num_fewshot}")
    _require(t.eval_tasks_include_path is None or bool(t.eval_tasks_include_path.strip()), "train.eval_tasks_include_path",
             "must name a folder or YAML file, or be null")


def _validate_mesh_cost(cfg: Config) -> None:
    axes = ("data", "fsdp", "expert", "tensor")
    for key in axes:
        _require(getattr(cfg.mesh, key) == -1 or getattr(cfg.mesh, key) >= 1, f"mesh.{key}",
                 "must be >= 1, or -1 to fill the remaining devices")
    _require(sum(getattr(cfg.mesh, k) == -1 for k in axes) <= 1, "mesh", "at most one axis may be -1")
    _require(cfg.cost.peak_tflops is None or cfg.cost.peak_tflops > 0, "cost.peak_tflops", "must be positive")
    if cfg.cost.peak_tflops is None:  # with a peak given, the hardware name is only a label
        require_choice(cfg.cost.hardware, HARDWARE_CHOICES, "cost.hardware")


def _validate_finetune(cfg: Config) -> None:
    f, lora = cfg.finetune, cfg.finetune.lora
    _require(f.freeze != "all_but_experts" or cfg.model.is_moe, "finetune.freeze",
             "all_but_experts needs an MoE model (model.moe.num_experts > 0)")
    if lora.rank == 0:
        return
    _require(f.freeze == "none", "finetune.freeze",
             "LoRA already freezes every base weight; leave freeze at none when finetune.lora.rank > 0")
    _require(lora.alpha > 0, "finetune.lora.alpha", "must be positive")
    _require(len(lora.targets) > 0, "finetune.lora.targets", f"name at least one of {', '.join(LORA_TARGETS.names)}")
    for target in lora.targets:
        LORA_TARGETS.check(target)
    m = cfg.model
    present = {"attention"} | ({"experts"} if m.is_moe else set()) | ({"shared_experts"} if m.shared_width else set())
    present |= {"mlp"} if m.n_sparse_layers < m.n_layers else set()
    _require(bool(set(lora.targets) & present), "finetune.lora.targets",
             f"{lora.targets} selects no weight of this model (it has {', '.join(sorted(present))})")
