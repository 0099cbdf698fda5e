"""Typed run configuration: dataclass schema, YAML loading with `base:` inheritance,
dotted command-line overrides, and validation that runs before anything compiles.

Merging and type coercion are done by OmegaConf structured configs; this module adds
what OmegaConf does not: errors that name the closest valid key, and cross-field checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

ROUTERS = ("topk_softmax", "softmax_topk", "expert_choice")
DISPATCHES = ("dropless", "capacity", "dense")
DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots_saveable")
ATTENTION_IMPLS = ("plain", "dot_product")
SCHEDULES = ("cosine", "linear", "constant")
WANDB_MODES = ("off", "offline", "online")
AUX_LOSS_SCOPES = ("batch", "sequence")
NONFINITE_POLICIES = ("skip", "stop")
FREEZE = ("none", "router", "all_but_experts")
LORA_TARGETS = ("attention", "experts", "mlp")


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with 1.2 booleans: only true/false are booleans, so `wandb: off` stays the string 'off'."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


class ConfigError(ValueError):
    """A user mistake in a config file or override; printed as one line by the CLI."""

    def __init__(self, message: str):
        # Messages quote user values, which may hold newlines or terminal escapes: escape every
        # non-printable character so the message stays one harmless line.
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0


@dataclass
class MoEConfig:
    num_experts: int = 0  # 0 = dense FFN
    top_k: int = 2
    router: str = "topk_softmax"
    renormalize: bool = False  # softmax_topk only: rescale the k weights to sum to 1
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    aux_loss_coef: float = 0.01
    aux_loss_scope: str = "batch"  # batch (Switch/GShard, global batch) | sequence (per sequence, averaged)
    z_loss_coef: float = 0.001
    bias_update_rate: float = 0.0  # > 0 turns on loss-free balancing
    jitter: float = 0.0
    router_dtype: str = "float32"


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: Optional[int] = 128  # None = dim // n_heads; may differ from it (as in HF configs)
    hidden_dim: int = 14336
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: Optional[int] = None  # None = full causal attention
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    # layers per iteration of the layer scan: 1 = a loop, compile time flat in depth; n_layers =
    # fully unrolled, static per-layer weight slices (CPU step 0.94x at 4 layers), compile grows
    scan_unroll: int = 1
    # plain: our einsum attention (scores materialised) | dot_product: jax.nn.dot_product_attention's
    # library kernel where one supports the shapes (cuDNN flash on NVIDIA GPUs, 16-bit; on Hopper
    # with packed documents as cuDNN's segment layout, models/packed_attention.py), else plain
    attention_impl: str = "dot_product"
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def is_moe(self) -> bool:
        return self.moe.num_experts > 0


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # an existing sentencepiece model; None = train one (cached)
    train_bytes: int = 8_000_000  # how much training text the BPE trainer sees
    byte_fallback: bool = True


@dataclass
class DataConfig:
    source: str = "python_source"
    text_key: str = "text"
    seq_len: int = 256
    batch_size: int = 8
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: bool = True
    num_workers: int = 0
    shuffle_buffer_docs: int = 0  # 0 = full global shuffle of documents


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainConfig:
    steps: int = 1000
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    init_from: Optional[str] = None
    on_nonfinite: str = "skip"  # skip: drop the update, count it, go on | stop: stop at the first bad step
    max_consecutive_nonfinite: int = 10  # skip policy: stop after this many bad steps in a row


@dataclass
class LoRAConfig:
    rank: int = 0  # 0 = off; > 0 trains low-rank adapters only (base weights frozen)
    alpha: float = 16.0  # the update is (alpha / rank) * A @ B
    targets: list[str] = field(default_factory=lambda: ["attention", "experts"])  # of attention | experts | mlp


@dataclass
class FinetuneConfig:
    freeze: str = "none"  # none | router | all_but_experts (full fine-tuning of the rest)
    router_lr_scale: float = 1.0  # the router's learning rate = optim.lr x this
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class MeshConfig:
    data: int = -1  # within a slice (ICI); -1 = fill the slice's remaining devices
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    # Across slices (DCN) for multi-slice TPU / multi-node runs: each axis is ici x dcn in total;
    # the product of the dcn_ values must equal the number of slices (processes on GPU clusters).
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1


@dataclass
class CostConfig:
    hardware: str = "auto"
    peak_tflops: Optional[float] = None
    price_per_device_hour: float = 2.0


@dataclass
class LoggingConfig:
    wandb: str = "off"
    wandb_project: str = "mixtral_jax"
    progress: bool = True


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


# ---------------------------------------------------------------- loading and merging


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML file, resolving `base:` (relative to the file, then to configs/)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config inheritance loops through {path}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = _yaml_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from None
    except yaml.MarkedYAMLError as err:  # safe loader: python/* tags land here, never run
        line = f":{err.problem_mark.line + 1}" if err.problem_mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({err.problem or err.context})") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"{path}: not valid YAML ({type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    bases = raw.pop("base", None)
    if bases is None:
        return raw
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: 'base' must be a config path or a list of them, got {bases!r}")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = _deep_merge(merged, _read_yaml(resolve_config_path(base, path.parent), seen + (path,)))
    return _deep_merge(merged, raw)


def resolve_config_path(name: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A config path as given, relative to a including file, or under the packaged configs/."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    candidates.append(CONFIG_DIR / name)
    if not str(name).endswith((".yaml", ".yml")):
        candidates += [CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / "model" / f"{name}.yaml"]
    for candidate in candidates:
        try:
            if candidate.is_file():
                return candidate
        except (OSError, ValueError):  # a NUL byte or a name too long for the OS: not a file
            continue
    raise ConfigError(f"config file not found: {name}")


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_keys(raw: dict, schema: type, prefix: str = "") -> None:
    """Unknown keys are named with the closest valid one, before OmegaConf sees them; so are
    values OmegaConf would coerce surprisingly (5 or 'yes' into a bool, `${...}` interpolation)."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{name}" for name in fields]
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; give it as a mapping, not {value!r}")
            _check_keys(value, sub, f"{dotted}.")
            continue
        # Annotations are strings (postponed evaluation); only plain `bool` fields are strict.
        if fields[key].type == "bool" and not isinstance(value, bool):
            raise ConfigError(f"config key '{dotted}': must be true or false, got {value!r}")
        if fields[key].type.startswith("list") and not isinstance(value, list):  # OmegaConf: TypeError
            raise ConfigError(f"config key '{dotted}': must be a list, got {value!r}")
        if any("${" in text for text in _strings(value)):
            # OmegaConf would resolve it, e.g. ${oc.env:WANDB_API_KEY} would copy a secret into
            # config.yaml and wandb: config files are plain data here.
            raise ConfigError(f"config key '{dotted}': '${{...}}' interpolation is not supported")


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a YAML value (keys included)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`a.b=c` strings -> nested dict, with YAML typing of the value (`null`, `1e-3`, `true`)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, text = item.split("=", 1)
        try:
            value = _yaml_load(text) if text != "" else ""
        except (yaml.YAMLError, RecursionError):  # not YAML (e.g. an unsafe tag): the plain string
            value = text
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override")
        node[parts[-1]] = value
    return nested


def from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (the union of files and overrides)."""
    from omegaconf import OmegaConf  # imported here so the schema alone needs only PyYAML
    from omegaconf.errors import OmegaConfBaseException

    _check_keys(raw, Config)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(raw))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).splitlines()[0]
        raise ConfigError(f"config key '{key}': {msg}") from None
    validate(cfg)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (with `base:` inheritance), apply `a.b=c` overrides, validate."""
    raw = _read_yaml(resolve_config_path(path)) if path else {}
    raw = _deep_merge(raw, parse_overrides(list(overrides or [])))
    return from_dict(raw)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))


def did_you_mean(value: str, choices: Sequence[str]) -> str:
    """"; did you mean 'X'?" for the closest of `choices`, or "" when none is close."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def validate(cfg: Config) -> None:
    """Range, type and cross-field checks (mixtral_jax/config_checks.py); raise ConfigError
    naming the offending key. Imported when called: the checks import this module's schema."""
    from mixtral_jax.config_checks import validate as check

    check(cfg)
