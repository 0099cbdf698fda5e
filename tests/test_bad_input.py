"""Bad input gets a one-line error that names what is wrong: a seeded config fuzz,
malformed files through the CLI, unusable corpora, oversized meshes, absurd planner inputs."""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import logging
import math
import random
import re
import subprocess
import sys
import time

import pytest
import yaml

from mixtral_jax.cli import main
from mixtral_jax.config import Config, ConfigError, DataConfig, from_dict, load_config, resolve_config_path
from mixtral_jax.config.loading import _read_yaml
from mixtral_jax.data import sources

# ---------------------------------------------------------------- config fuzz

REAL_CONFIGS = ["configs/quickstart.yaml", *sorted(glob.glob("configs/model/*.yaml")),
                *sorted(glob.glob("configs/finetune/*.yaml"))]


def _schema(schema: type, prefix: str = "") -> tuple[dict[str, str], list[str]]:
    """(dotted leaf -> annotation string, dotted sections) of the config dataclasses."""
    leaves: dict[str, str] = {}
    sections: list[str] = []
    for f in dataclasses.fields(schema):
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            sections.append(prefix + f.name)
            more, subsections = _schema(sub, f"{prefix}{f.name}.")
            leaves.update(more)
            sections += subsections
        else:
            leaves[prefix + f.name] = str(f.type)
    return leaves, sections


LEAVES, SECTIONS = _schema(Config)
NAN, INF = float("nan"), float("inf")
# Wrong or out-of-range values by declared type (None is valid for the Optional ones).
BAD_VALUES: dict[str, list] = {
    "int": [-1, 0, -(2**40), 10**30, 2**31, 2**63, "abc", "", "???", 3.5, True, None, [1], {"a": 1}, NAN],
    "float": [-1.0, 0.0, NAN, INF, -INF, 1e300, "fast", "1e-3", [0.1], {"x": 1}, None, True, "???"],
    "str": [123, "", "a\nb", "\x1b[31mred", "${oc.env:HOME}", "x/y", "..", ["x"], {"a": "b"}, None, True],
    "bool": [1, 0, 5, "yes", "off", "true", None, [True], 2.5],
    "Optional[int]": [0, -5, 3, 10**30, "x", 1.5, [1], {"a": 1}, NAN],
    "Union[int, str]": [0, -5, 10**30, 2**31, "", "x", "AUTO", 1.5, True, None, [1], {"a": 1}, NAN],
    "Optional[float]": [0.0, -1.0, NAN, INF, "x", [1.0]],
    "Optional[str]": [123, "", "${oc.env:HOME}", ["a"], {"a": 1}],
    "list[str]": [[], [1], [["x"]], [None], "attention", None, {"a": 1}, ["atention"], ["mlp"], ["experts"]],
    "list[int]": [[1.5], ["x"], "x", 3, [None], {"a": 1}, [-1], [10**6], [True]],  # model.moe.dense_layers
    "list[MixtureSource]": ["x", 3, [1], ["x"], [None], {"a": 1}, None, [[1]], True],  # data.mixture (test_mixture.py)
}
# Cross-field rules may blame another key of the same rule (e.g. n_heads=3 is reported on
# model.n_kv_heads: "n_heads (3) must be a multiple of n_kv_heads (2)").
RELATED = [
    {"model.n_heads", "model.n_kv_heads", "model.dim", "model.head_dim"},
    {"model.moe.num_experts", "model.moe.top_k", "model.moe.router", "model.moe.bias_update_rate",
     "finetune.freeze", "finetune.lora.targets"},
    {"data.seq_len", "model.max_seq_len"},
    {"data.batch_size", "optim.grad_accum"},
    {"mesh", "mesh.data", "mesh.fsdp", "mesh.expert", "mesh.tensor"},
    {"cost.hardware", "cost.peak_tflops"},
    {"finetune.lora.rank", "finetune.freeze", "finetune.lora.alpha", "finetune.lora.targets"},
]


def _allowed(key: str) -> set[str]:
    return {key}.union(*(group for group in RELATED if key in group))


def _blamed(message: str) -> str:
    """The key an error names first ('config key X' / 'unknown config key X'), list index dropped."""
    found = re.search(r"config key '([^']*)'", message)
    assert found, f"error names no config key: {message}"
    return re.sub(r"\[\d+\]$", "", found.group(1))


def _typo(rng: random.Random, name: str) -> str:
    i, kind = rng.randrange(len(name)), rng.choice(["drop", "swap", "add"])
    if kind == "drop" and len(name) > 1:
        return name[:i] + name[i + 1:]
    if kind == "swap" and i + 1 < len(name) and name[i] != name[i + 1]:
        return name[:i] + name[i + 1] + name[i] + name[i + 2:]
    return name[:i] + rng.choice("abcxyz_") + name[i:]


def _set(raw: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def _delete(raw: dict, dotted: str) -> None:
    parent, _, last = dotted.rpartition(".")
    node = _lookup(raw, parent) if parent else raw
    if isinstance(node, dict):
        node.pop(last, None)


def _override(dotted: str, value) -> str:
    return f"{dotted}={value if isinstance(value, str) else json.dumps(value)}"


def _lookup(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return KeyError
        node = node[part]
    return node


def _must_reject(key: str, value) -> bool:
    """Values that must never load, whatever else the config says (the fuzz's findings)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
        return True
    if LEAVES[key] == "bool" and not isinstance(value, bool):  # OmegaConf made 5 or 'yes' True
        return True
    return isinstance(value, str) and ("${" in value or not value.isprintable())


def _mutate(rng: random.Random, raw: dict, alone: bool = True) -> tuple[str, set[str], str | None, tuple | None]:
    """Apply one random mutation: (description, keys the error may name, override or None,
    (key, value) that must be rejected or None)."""
    kind = rng.choice(["value", "value", "value", "delete", "unknown"] + (["section"] if alone else []))
    if kind == "delete":
        key = rng.choice(sorted(LEAVES))
        _delete(raw, key)
        return f"delete {key}", _allowed(key), None, None
    if kind == "unknown":
        section = rng.choice(["", *SECTIONS])
        names = [k.rsplit(".", 1)[-1] for k in LEAVES if k.rpartition(".")[0] == section] or ["run"]
        name = _typo(rng, rng.choice(names)) if rng.random() < 0.7 else rng.choice(["foo", "lr2", "x1", "Dim"])
        dotted = f"{section}.{name}" if section else name
        if dotted in LEAVES or dotted in SECTIONS:
            return f"noop typo {dotted}", set(), None, None
        _set(raw, dotted, rng.choice([1, "x", 0.5, None]))
        return f"unknown key {dotted}", {dotted}, None, None
    if kind == "section":
        section = rng.choice(SECTIONS)
        value = rng.choice([None, 3, "x", [1, 2]])
        _set(raw, section, value)
        return f"section {section}={value!r}", {section}, None, None
    key = rng.choice(sorted(LEAVES))
    value = rng.choice(BAD_VALUES[LEAVES[key]])
    _set(raw, key, copy.deepcopy(value))
    return f"{key}={value!r}", _allowed(key), _override(key, value), (key, value) if _must_reject(key, value) else None


def test_config_fuzz_only_config_errors_naming_the_key(tmp_path):
    rng = random.Random(8)
    bases = {name: _read_yaml(resolve_config_path(name)) for name in REAL_CONFIGS}
    outcomes = {"loaded": 0, "rejected": 0}
    start = time.perf_counter()
    for case in range(300):
        name = rng.choice(REAL_CONFIGS)
        raw = copy.deepcopy(bases[name])
        count = rng.choice([1, 1, 2])
        mutations = [_mutate(rng, raw, alone=count == 1) for _ in range(count)]
        allowed = set().union(*(m[1] for m in mutations))
        route = rng.choice(["dict", "dict", "file", "override"])
        if route == "override" and (count > 1 or mutations[0][2] is None):
            route = "dict"
        what = f"case {case} ({route}) {name}: " + "; ".join(m[0] for m in mutations)
        # Override text is re-read as YAML ('a\nb' folds to 'a b'), so only the other routes
        # deliver the exact value; it must still be there (a later mutation may replace it).
        doomed = [m[3] for m in mutations if m[3] and route != "override"
                  and (_lookup(raw, m[3][0]) is m[3][1] or _lookup(raw, m[3][0]) == m[3][1])]
        try:
            if route == "override":
                load_config(name, [mutations[0][2]])
            elif route == "file":
                path = tmp_path / f"case{case}.yaml"
                path.write_text(yaml.safe_dump(raw))
                load_config(path)
            else:
                from_dict(raw)
            assert not doomed, f"{what}: loaded, but {doomed} must be rejected"
            outcomes["loaded"] += 1
        except ConfigError as err:
            message = str(err)
            assert "\n" not in message and "\r" not in message, what
            assert _blamed(message) in allowed, f"{what}: {message}"
            outcomes["rejected"] += 1
        except Exception as err:  # noqa: BLE001 - the point: nothing but ConfigError escapes
            pytest.fail(f"{what}: {type(err).__name__}: {err}")
    assert outcomes["rejected"] > 150 and outcomes["loaded"] > 20, outcomes
    assert time.perf_counter() - start < 60  # validation only: nothing compiles


@pytest.mark.parametrize("override, key", [
    ("model.moe.top_k=0", "model.moe.top_k"), ("model.moe.top_k=9", "model.moe.top_k"),
    ("model.sliding_window=0", "model.sliding_window"), ("data.seq_len=100000", "data.seq_len"),
    ("model.n_kv_heads=3", "model.n_kv_heads"), ("data.batch_size=-8", "data.batch_size"),
    ("model.head_dim=15", "model.head_dim"), ("optim.lr=nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=-1e-3", "optim.lr"), ("cost.price_per_device_hour=.nan", "cost.price_per_device_hour"),
    ("model.dim=99999999999999999999", "model.dim"), ("train.steps=true", "train.steps"),
    ("data.pack=1", "data.pack"), ("logging.progress=yes", "logging.progress"), ("run.seed=-1", "run.seed"),
    ("run.name=..", "run.name"), ("run.name=${oc.env:HOME}", "run.name"), ("data.source=jsonl:", "data.source"),
    ("cost.hardware=h1000", "cost.hardware"), ("finetune.lora.targets=attention", "finetune.lora.targets"),
    ("model.moe.jitter=-inf", "model.moe.jitter"), ("mesh.fsdp=0", "mesh.fsdp"),
])
def test_named_bad_values_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as err:
        load_config("configs/quickstart.yaml", [override])
    assert _blamed(str(err.value)) == key and "\n" not in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("model:\n  dim: [1, 2\n", "not valid YAML"),
    ("model:\n\tdim: 3\n", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("base: 5\n", "'base' must be a config path"),
    ("base: [null]\n", "'base' must be a config path"),
    ("base: nowhere.yaml\n", "config file not found: nowhere.yaml"),
    ("model: 3\n", "config key 'model' is a section"),
    ("train:\n  steps: !!python/object/apply:os.getcwd []\n", "not valid YAML"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "not valid YAML"),
])
def test_malformed_config_files(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(expected)) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_unreadable_config_files(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00model: 1")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(tmp_path / "binary.yaml")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="inheritance loops"):
        load_config(tmp_path / "loop.yaml")
    for name in ("a\x00b.yaml", "x" * 5000):
        with pytest.raises(ConfigError, match="config file not found"):
            load_config(name)


def test_cli_bad_key_and_malformed_yaml_exit_2_with_one_line(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  dim: [1, 2\nrun: {name: x\n")
    for args in (["train", "--config", "configs/quickstart.yaml", "bad.key=1"],
                 ["train", "--config", str(bad_yaml)],
                 ["train", "--config", "configs/quickstart.yaml", "optim.lr=nan"],
                 ["cost", "--config", "mistral_7b", "--tokens", "abc"]):  # argparse's own errors too
        proc = subprocess.run([sys.executable, "-m", "mixtral_jax.cli", *args], capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "error:" in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""


# ---------------------------------------------------------------- corpora


def _docs(source: str) -> list:
    cfg = DataConfig(source=source)
    return list(sources.load_documents(cfg, "train")) + list(sources.load_documents(cfg, "validation"))


def test_empty_corpora_are_clear_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl has no records \(empty\)"):
        _docs(f"jsonl:{tmp_path / 'empty.jsonl'}")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    with pytest.raises(ValueError, match="no records"):
        _docs(f"jsonl:{tmp_path / 'blank.jsonl'}")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="the directory has no files"):
        _docs(f"text:{tmp_path / 'empty_dir'}")
    with pytest.raises(ValueError, match="not a directory"):
        _docs(f"text:{tmp_path / 'missing'}")


def test_text_dir_of_only_binary_files_names_the_counts(tmp_path, caplog):
    (tmp_path / "a.bin").write_bytes(bytes(range(256)))
    (tmp_path / "b.txt").write_bytes("\xe9t\xe9".encode("latin-1"))
    (tmp_path / "c.txt").write_text("   \n")
    with pytest.raises(ValueError, match=r"among 3 file\(s\) \(2 binary or non-UTF-8, 0 unreadable, 1 empty\)"):
        _docs(f"text:{tmp_path}")
    (tmp_path / "d.txt").write_text("real text\n")
    with caplog.at_level(logging.WARNING):
        assert _docs(f"text:{tmp_path}") == ["real text\n"]
    assert "skipped 2 binary or non-UTF-8 file(s)" in caplog.text


def test_jsonl_bad_lines_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": f"document {i}"}).encode() for i in range(6)]
    bad = [b'{"text": "caf\xe9"}', b"not json", b'{"body": "no text field"}', b'{"text": 5}', b'["a list"]',
           b'{"text": ""}', b"[" * 100000]
    path.write_bytes(b"\n".join(good[:3] + bad + good[3:]) + b"\n")
    with caplog.at_level(logging.WARNING):
        docs = _docs(f"jsonl:{path}")
    assert sorted(docs) == [f"document {i}" for i in range(6)]
    assert "1 not UTF-8, 2 invalid JSON, 4 without a non-empty string field 'text'" in caplog.text
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_bytes(b"\n".join(bad) + b"\n")
    with pytest.raises(ValueError, match=r"no usable records .* in .*only_bad\.jsonl: 7 line\(s\)") as err:
        _docs(f"jsonl:{only_bad}")
    assert "\n" not in str(err.value)


def test_bad_corpus_through_the_cli_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["train", "--config", "configs/quickstart.yaml", f"data.source=jsonl:{tmp_path / 'empty.jsonl'}",
                 f"run.out_dir={tmp_path}", "logging.wandb=off", "logging.progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "empty.jsonl has no records" in err, err


# ---------------------------------------------------------------- mesh


def test_mesh_larger_than_the_devices_is_a_config_error():
    import jax

    from mixtral_jax.parallel.mesh import make_mesh

    cfg = load_config("configs/quickstart.yaml", ["mesh.fsdp=16", "mesh.data=1"])
    with pytest.raises(ConfigError, match=r"needs 16 devices but 8 were found") as err:
        make_mesh(cfg.mesh, jax.devices())
    assert "\n" not in str(err.value)
    cfg = load_config("configs/quickstart.yaml", ["mesh.fsdp=3"])  # data=-1 cannot fill 8 / 3
    with pytest.raises(ConfigError, match="mesh.data"):
        make_mesh(cfg.mesh, jax.devices())


# ---------------------------------------------------------------- cost / params planners


@pytest.mark.parametrize("args, expected", [
    (["--tokens", "-1"], "--tokens must be a finite number > 0"), (["--tokens", "0"], "--tokens"),
    (["--tokens", "nan"], "--tokens"), (["--tokens", "inf"], "--tokens"), (["--tokens", "1e400"], "--tokens"),
    (["--device-hours", "-5"], "--device-hours"), (["--device-hours", "nan"], "--device-hours"),
    (["--device-hours", "0"], "--device-hours"), (["--device-hours", "1e300"], "device-hours (1e+300)"),
    (["--tokens", "1e9", "--mfu", "0"], "--mfu"), (["--tokens", "1e9", "--mfu", "1.5"], "--mfu"),
    (["--tokens", "1e9", "--mfu", "nan"], "--mfu"), (["--tokens", "1e9", "--mfu", "-0.4"], "--mfu"),
    (["--tokens", "1e9", "--price", "-2"], "--price"), (["--tokens", "1e9", "--price", "inf"], "--price"),
    (["--tokens", "1e9", "--devices", "0"], "--devices"), (["--tokens", "1e9", "--devices", "-8"], "--devices"),
    (["--tokens", "1e9", "--devices", "99999999999999999999"], "--devices"),
    (["--tokens", "1e9", "--peak-tflops", "0"], "--peak-tflops"), (["--tokens", "1e300"], "too large"),
    (["--tokens", "1e9", "--seq-len", "0"], "--seq-len"), (["--tokens", "1e9", "--hardware", "h1000"], "h100"),
    (["--tokens", "1e9", "--device-hours", "5"], "exactly one of"), ([], "exactly one of"),
])
def test_cost_refuses_absurd_inputs(capsys, args, expected):
    start = time.perf_counter()
    assert main(["cost", "--config", "mistral_7b", "--hardware", "h100", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    assert time.perf_counter() - start < 5


def test_cost_answers_huge_budgets_quickly(capsys):
    start = time.perf_counter()
    assert main(["cost", "--config", "mixtral_8x7b", "--hardware", "h100", "--tokens", "1e30", "--json",
                 "--devices", "2147483647", "--price", "0"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["tokens"] == 1e30 and math.isfinite(figures["cost_usd"]) and figures["cost_usd"] == 0
    assert main(["cost", "--config", "mixtral_8x7b", "--hardware", "h100", "--device-hours", "1e20", "--json"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["tokens"])
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("args, expected", [
    (["--mesh", "fsdp=8,epxert=2"], "did you mean 'expert'"), (["--mesh", "fsdp=0"], "fsdp=N with N >= 1"),
    (["--mesh", "fsdp=-2"], "fsdp=N"), (["--mesh", "fsdp=²"], "fsdp=N"), (["--mesh", "fsdp"], "fsdp=N"),
    (["--mesh", "fsdp=2,fsdp=4"], "given twice"), (["--mesh", "data=99999999"], "devices in total"),
    (["--mesh", "data=3"], "not divisible by the data-like mesh axes (3)"),
    (["--mesh", "fsdp=2", "--device", "h1000"], "unknown device 'h1000'"),
    (["model.dim=1e30"], "model.dim"), (["model.n_layers=-1"], "model.n_layers"),
])
def test_params_refuses_absurd_inputs(capsys, args, expected):
    assert main(["params", "--config", "mixtral_8x7b", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def test_params_answers_huge_models_quickly(capsys):
    start = time.perf_counter()
    big = ["model.n_layers=2000000000", "model.vocab_size=2000000000", "model.hidden_dim=2000000000"]
    assert main(["params", "--config", "mixtral_8x7b", *big, "--mesh", "fsdp=8", "--device", "h100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] > 10**18 and out["memory"]["fits"] is False
    assert time.perf_counter() - start < 30
