"""One owner for every fact: each choice set is one registry that validation, the CLI's help and
the implementations all read; one hardware table behind cost, the memory planner, config checks
and the CLI; the config reference generated from the schema and current."""

from __future__ import annotations

import dataclasses

import pytest

from mixtral_jax import hardware
from mixtral_jax.cli import main
from mixtral_jax.config import ConfigError, load_config
from mixtral_jax.config import choices
from mixtral_jax.config.reference import DOC_PATH, render, sections
from mixtral_jax.config.registry import Registry
from mixtral_jax.config.schema import Config

REGISTRIES = [value for value in vars(choices).values() if isinstance(value, Registry)]


@pytest.mark.parametrize("registry", [r for r in REGISTRIES if r.module], ids=lambda r: r.key)
def test_every_declared_choice_has_an_implementation(registry):
    assert set(registry.implementations()) == set(registry.names)


@pytest.mark.parametrize("key,registry", list(choices.CHOICE_KEYS.items()), ids=lambda x: getattr(x, "key", x))
def test_validation_accepts_exactly_the_registry_names(key, registry):
    value = registry.names[-1]
    override = f"{key}=[{value}]" if key == "finetune.lora.targets" else f"{key}={value}"
    if key != "finetune.lora.targets":  # a list, only checked when LoRA is on
        load_config("configs/quickstart.yaml", [override])
        with pytest.raises(ConfigError, match=f"'{key}': 'not_a_choice' is not one of {', '.join(registry.names)}"):
            load_config("configs/quickstart.yaml", [f"{key}=not_a_choice"])


def test_a_registry_refuses_undeclared_and_twice_registered_names():
    registry = Registry("model.demo", {"a": "one", "b": "two"}, module="mixtral_jax.hardware")
    registry.register("a", 1)
    with pytest.raises(KeyError, match="not declared"):
        registry.register("c", 3)
    with pytest.raises(KeyError, match="registered twice"):
        registry.register("a", 2)
    with pytest.raises(KeyError, match="registered nothing"):
        registry.get("b")
    with pytest.raises(ConfigError, match="did you mean 'a'"):
        registry.check("aa")
    assert registry.get("a") == 1 and registry.register("b", None) is None and registry.get("b") is None


def test_tables_keyed_by_choice_names_cover_every_choice():
    from mixtral_jax.models.params import COMPONENTS
    from mixtral_jax.training.memory import KEPT_BY_REMAT

    assert set(KEPT_BY_REMAT) == set(choices.REMAT_POLICIES.names)  # the memory planner's activations
    assert set(choices.LORA_TARGETS.names) <= set(COMPONENTS)  # LoRA targets are parameter components


def test_train_help_lists_every_choice_from_the_registries(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for key, registry in choices.CHOICE_KEYS.items():
        assert f"{key}: {', '.join(registry.names)}" in text
    assert ", ".join(hardware.HARDWARE_CHOICES) in text


def test_one_hardware_table_behind_cost_memory_and_config():
    from mixtral_jax.training import cost, memory

    for row in hardware.HARDWARE:
        load_config("configs/quickstart.yaml", [f"cost.hardware={row.name}"])  # config checks read it
        if row.peak_tflops is not None:
            assert cost.peak_tflops(row.name) == (row.peak_tflops, "table")
        if row.memory_gib is not None:
            assert memory.usable_bytes(row.name) == int(row.memory_gib * memory.GIB * memory.USABLE_FRACTION)
    # jax's device_kind strings, as the runtime reports them, map to the rows
    assert hardware.from_device_kind("NVIDIA H100 80GB HBM3").name == "h100"
    assert hardware.from_device_kind("NVIDIA H200").name == "h200"
    assert hardware.from_device_kind("NVIDIA A100-SXM4-40GB").name == "a100-40gb"
    assert hardware.from_device_kind("NVIDIA A100-SXM4-80GB").name == "a100"
    assert hardware.from_device_kind("TPU v5 lite").name == "tpu-v5e"
    assert hardware.from_device_kind("TPU v5").name == "tpu-v5p"
    assert hardware.from_device_kind("TPU v6 lite").name == "trillium"
    assert hardware.from_device_kind("cpu").name == "cpu"
    assert hardware.from_device_kind("Some Future Chip") is None


def test_head_dim_is_resolved_once_in_the_config():
    cfg = load_config("configs/quickstart.yaml", ["model.head_dim=null", "model.dim=96", "model.n_heads=4"])
    assert cfg.model.head_dim == 24
    with pytest.raises(ConfigError, match="model.n_heads"):
        load_config("configs/quickstart.yaml", ["model.head_dim=null", "model.dim=90", "model.n_heads=4"])


def _leaf_keys(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaf_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_config_reference_covers_every_key_with_a_meaning():
    rows = {key: meaning for _, section in sections() for key, _, _, meaning in section}
    assert set(rows) == set(_leaf_keys())
    assert not [key for key, meaning in rows.items() if not meaning], "every key needs a comment in schema.py"


def test_docs_configs_md_is_current():
    assert DOC_PATH.read_text() == render(), "run: python -m mixtral_jax.config.reference --write"
