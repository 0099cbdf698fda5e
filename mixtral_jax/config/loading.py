"""Loading a Config: YAML files with `base:` inheritance, dotted command-line overrides, and
the merge into the typed schema (OmegaConf structured configs), then validation (checks.py).

OmegaConf does the merging and type coercion; this module adds what it does not: errors that
name the closest valid key, and values it would coerce surprisingly refused up front.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
import os
import re
from pathlib import Path
from typing import Any, Iterator

import yaml

from mixtral_jax.config.checks import validate
from mixtral_jax.config.errors import ConfigError
from mixtral_jax.config.schema import Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


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
    hints = typing.get_type_hints(schema)  # the annotations resolved (they are strings)
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
        item = typing.get_args(hints.get(key))
        if item and dataclasses.is_dataclass(item[0]):  # a list of sections (data.mixture): each entry
            for i, entry in enumerate(value):
                if not isinstance(entry, dict):
                    raise ConfigError(f"config key '{dotted}[{i}]' is a section; give it as a mapping, not {entry!r}")
                _check_keys(entry, item[0], f"{dotted}[{i}].")
            continue
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
