"""Nothing executes code from data: no unpickling or eval in the package, config
files are plain data, and secrets in the environment never reach the run directory or logs."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixtral_jax.config import ConfigError, load_config

PACKAGE = Path(__file__).resolve().parent.parent / "mixtral_jax"
UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    """'a.b.c' for a Name / Attribute chain, '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _safe_loader_classes(tree: ast.Module) -> set[str]:
    """Classes of this module that subclass a safe PyYAML loader (directly or via each other)."""
    safe: set[str] = set()
    classes = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    changed = True
    while changed:
        changed = False
        for cls in classes:
            bases = {_dotted(b).rsplit(".", 1)[-1] for b in cls.bases}
            if cls.name not in safe and bases & (SAFE_YAML_LOADERS | safe):
                safe.add(cls.name)
                changed = True
    return safe


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """'file:line: what' for each way `source` could run code from data. Parsed, not grepped,
    so docstrings that mention eval( or pickle do not count."""
    tree = ast.parse(source, filename)
    safe_loaders = _safe_loader_classes(tree)
    found: list[str] = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNPICKLING_MODULES:
                    flag(node, f"imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            flag(node, f"imports from {node.module}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            flag(node, f"{name}(")
        elif name.split(".")[0] in UNPICKLING_MODULES and last in ("load", "loads", "Unpickler", "open"):
            flag(node, f"{name}(")
        elif name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
            flag(node, "torch.load( without weights_only=True")
        elif name in ("np.load", "numpy.load", "jnp.load") and _is_true(_keyword(node, "allow_pickle")):
            flag(node, f"{name}( with allow_pickle=True")
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            flag(node, f"{name}(")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = _dotted(loader).rsplit(".", 1)[-1] if loader is not None else ""
            if loader_name not in SAFE_YAML_LOADERS | safe_loaders:
                flag(node, f"{name}( with Loader={loader_name or 'default'} (not a SafeLoader subclass)")
    return found


def test_scanner_flags_each_unsafe_pattern():
    bad = "\n".join([
        "import pickle", "from dill import loads", "pickle.loads(b)", "eval('1')", "exec('x=1')",
        "torch.load(f)", "torch.load(f, weights_only=False)", "np.load(f, allow_pickle=True)",
        "yaml.load(t, Loader=yaml.Loader)", "yaml.load(t)", "yaml.unsafe_load(t)", "yaml.full_load(t)",
    ])
    assert len(unsafe_calls(bad, "bad.py")) == 12, unsafe_calls(bad, "bad.py")
    fine = "\n".join([
        '"""eval( and pickle.load in a docstring are text"""', "torch.load(f, weights_only=True)",
        "np.load(f)", "np.load(f, allow_pickle=False)", "yaml.safe_load(t)", "yaml.load(t, Loader=yaml.SafeLoader)",
        "class L(yaml.SafeLoader): pass", "class M(L): pass", "yaml.load(t, Loader=M)", "model.eval()",
    ])
    assert unsafe_calls(fine, "fine.py") == []


def test_package_never_unpickles_or_evals():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = [hit for path in files
             for hit in unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))]
    assert not found, "code could run from data:\n" + "\n".join(found)


@pytest.mark.parametrize("payload", [
    '!!python/object/apply:os.system ["touch {marker}"]',
    '!!python/object/new:os.system ["touch {marker}"]',
    '!!python/name:os.system',
])
def test_yaml_python_tags_are_rejected_not_run(tmp_path, payload):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.yaml"
    path.write_text(f"base: quickstart.yaml\nrun:\n  name: {payload.format(marker=marker)}\n")
    with pytest.raises(ConfigError, match="not valid YAML.*python"):
        load_config(path)
    # as an override the value is not YAML-constructible either: it stays a plain string
    try:
        load_config("configs/quickstart.yaml", [f"run.name={payload.format(marker=marker)}"])
    except ConfigError:
        pass
    assert not marker.exists()


def test_interpolation_cannot_copy_the_environment(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sk-fake-secret-1234")
    for override in ("run.name=${oc.env:WANDB_API_KEY}", "logging.wandb_project=x-${oc.env:WANDB_API_KEY}"):
        with pytest.raises(ConfigError, match="interpolation is not supported") as err:
            load_config("configs/quickstart.yaml", [override])
        assert "sk-fake-secret-1234" not in str(err.value)


SECRETS = {"WANDB_API_KEY": "sk-fake-secret-1234", "HF_TOKEN": "hf_fake-secret-5678",
           "HUGGING_FACE_HUB_TOKEN": "hf_fake-secret-9012", "AWS_SECRET_ACCESS_KEY": "aws-fake-secret-3456"}
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
        "model.hidden_dim=128", "model.sliding_window=32", "data.seq_len=64", "data.batch_size=8",
        "optim.warmup_steps=5", "logging.progress=false", "logging.wandb=offline", "train.steps=2",
        "train.log_every=1", "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2"]


def test_secrets_in_environment_reach_no_file_or_output(tmp_path, corpus_cache):
    wandb_home = tmp_path / "wandb_home"  # wandb's own config / cache dirs, scanned as well
    env = {**os.environ, **SECRETS, "MIXTRAL_JAX_CACHE": str(corpus_cache), "JAX_PLATFORMS": "cpu",
           "WANDB_CONFIG_DIR": str(wandb_home / "config"), "WANDB_CACHE_DIR": str(wandb_home / "cache"),
           "WANDB_DATA_DIR": str(wandb_home / "data"), "WANDB_ARTIFACT_DIR": str(wandb_home / "artifacts")}
    proc = subprocess.run(
        [sys.executable, "-m", "mixtral_jax.cli", "train", "--config", "configs/quickstart.yaml",
         f"run.out_dir={tmp_path / 'runs'}", "run.name=secret_check", *TINY],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "secret_check"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert (run_dir / "config.yaml") in written and (run_dir / "metrics.jsonl") in written
    assert (run_dir / "summary.json") in written
    assert any("wandb" in p.parts and p.suffix == ".wandb" for p in written), "no wandb offline run written"
    for secret in SECRETS.values():
        assert secret not in proc.stdout and secret not in proc.stderr
        leaked = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert not leaked, f"{secret} written to {leaked}"
