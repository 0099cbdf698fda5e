"""Generate the config reference (docs/configs.md) from the schema and the choice registries.

Every key's type and default come from the dataclasses in schema.py, its description from the
comment on (or above) its line there, and the values a choice key takes from config/choices.py.
tests/test_registries.py fails when docs/configs.md differs from what this writes, so the
reference cannot drift from the code.

    python -m mixtral_jax.config.reference --write    # regenerate docs/configs.md
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import re
import tokenize
from pathlib import Path
from typing import Any, Iterator

from mixtral_jax.config.choices import CHOICE_KEYS, DATA_SOURCES
from mixtral_jax.config.registry import Registry
from mixtral_jax.config.schema import Config
from mixtral_jax.hardware import HARDWARE, HARDWARE_CHOICES

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "configs.md"
# data.source takes a registry's name as its KIND (KIND:ARGUMENT), so it is not in CHOICE_KEYS.
_OTHER_CHOICES = {"data.source": DATA_SOURCES}


def field_comments(cls: type) -> dict[str, str]:
    """field name -> its comment in the class source: the trailing one, else the block above."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    out: dict[str, str] = {}
    lines = source.splitlines()
    for number, line in enumerate(lines, start=1):
        match = re.match(r"\s+(\w+):", line)
        if not match or match.group(1) not in {f.name for f in dataclasses.fields(cls)}:
            continue
        if number in comments:
            out[match.group(1)] = comments[number]
            continue
        above, previous = [], number - 1
        while previous in comments and lines[previous - 1].strip().startswith("#"):
            above.insert(0, comments[previous])
            previous -= 1
        if above:
            out[match.group(1)] = " ".join(above)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _value(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{value}`"


def _type(annotation: str) -> str:
    text = re.sub(r"Optional\[(.*)\]", r"\1 or null", str(annotation))
    return re.sub(r"Union\[(\w+), (\w+)\]", r"\1 or \2", text)


def sections(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, list[tuple[str, str, str, str]]]]:
    """(section, [(key, type, default, description), ...]) for every section, nested ones after."""
    comments = field_comments(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = _default(f)
        if dataclasses.is_dataclass(default):
            nested.append((type(default), f"{key}."))
            continue
        rows.append((key, _type(f.type), _value(default), comments.get(f.name, "")))
    if rows:
        yield prefix.rstrip("."), rows
    for sub, sub_prefix in nested:
        yield from sections(sub, sub_prefix)


def _choices(key: str) -> str:
    registry: Registry | None = CHOICE_KEYS.get(key) or _OTHER_CHOICES.get(key)
    if registry is not None:
        return "<br>".join(f"`{name}`: {registry.describe(name)}" for name in registry)
    if key == "cost.hardware":
        peaks = {h.name: h.peak_tflops for h in HARDWARE}
        return "<br>".join(f"`{name}`" + (f" ({peaks[name]:g} TFLOP/s bf16)" if peaks.get(name) else
                                         " (detect)" if name == "auto" else " (peak measured)")
                           for name in HARDWARE_CHOICES)
    return ""


def render() -> str:
    out = ["# Config reference", "",
           "Every key a run config takes, its type, default and meaning. Generated from "
           "`mixtral_jax/config/schema.py` and `mixtral_jax/config/choices.py` by "
           "`python -m mixtral_jax.config.reference --write`; a test keeps this page current.", "",
           "A config is YAML: `base: other.yaml` (or a list) inherits, and `mixtral-jax train --config F a.b=c` "
           "overrides any key from the command line. An unknown key is refused with the closest valid one.", ""]
    for section, rows in sections():
        out += [f"## `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, type_name, default, comment in rows:
            choices = _choices(key)
            meaning = f"{comment}:<br>{choices}" if comment and choices else comment or choices
            out.append(f"| `{key}` | {type_name} | {default} | {meaning.replace('|', '&#124;')} |")
        out.append("")
    return "\n".join(out + hardware_table())


def hardware_table() -> list[str]:
    """The hardware table (hardware.py) as the names `cost.hardware`, `cost --hardware` and
    `params` / `compile --device` take."""
    out = ["## Hardware", "",
           "The names `cost.hardware` and `mixtral-jax cost --hardware` take, and those of `params` / `compile "
           "--device` (the ones with a memory figure), from `mixtral_jax/hardware.py`. Peaks are dense bf16 "
           "data-sheet figures without sparsity; `auto` detects the device a run is on.", "",
           "| name | matched in jax's `device_kind` | bf16 peak TFLOP/s | memory GiB |", "|---|---|---:|---:|"]
    for row in HARDWARE:
        kinds = ", ".join(f"`{kind}`" for kind in row.device_kinds)
        peak = f"{row.peak_tflops:g}" if row.peak_tflops is not None else "measured at run time"
        memory = f"{row.memory_gib:g}" if row.memory_gib is not None else "host memory, not planned"
        out.append(f"| `{row.name}` | {kinds} | {peak} | {memory} |")
    out.append("")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print (or --write) the config reference, docs/configs.md.")
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH} instead of printing")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.write_text(text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
