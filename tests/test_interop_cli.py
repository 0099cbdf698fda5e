"""`mixtral-jax import-hf` / `export-hf`: an HF model becomes a run dir that eval, export and
`train.init_from` read, and comes back out bit-identical."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="HF interop tests compare against transformers")
torch = pytest.importorskip("torch", reason="HF interop tests run the reference model in torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from hf_tiny import SEQ, TRUNK, tiny_hf_model  # noqa: E402

from mixtral_jax.cli import main  # noqa: E402
from mixtral_jax.config import load_config, save_config  # noqa: E402
from mixtral_jax.training.evaluate import load_run_model  # noqa: E402

FAKE_TOKENIZER = b"not parsed by import: copied byte for byte"


def _hf_model(kind: str):
    return tiny_hf_model(kind, attn_implementation="eager")


@pytest.fixture(scope="module", params=["mistral", "mixtral"])
def imported(request, tmp_path_factory):
    kind = request.param
    hf_model = _hf_model(kind)
    root = tmp_path_factory.mktemp(kind)
    hf_dir, run = root / "hf", root / "runs" / f"imported_{kind}"
    hf_model.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.model").write_bytes(FAKE_TOKENIZER)
    assert main(["import-hf", str(hf_dir), "--out", str(run)]) == 0
    return kind, hf_model, hf_dir, run


def test_imported_run_matches_hf_logits(imported):
    kind, hf_model, _, run = imported
    model, cfg, step = load_run_model(run)
    assert step == 0 and cfg.model.is_moe == (kind == "mixtral")
    assert cfg.run.name == run.name and cfg.run_dir == run
    assert load_config(run / "config.yaml") == cfg  # the written config is resolved: it round-trips
    assert (run / "tokenizer.model").read_bytes() == FAKE_TOKENIZER
    tokens = np.random.default_rng(1).integers(0, TRUNK["vocab_size"], size=(2, SEQ)).astype(np.int32)
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()
    ours = np.asarray(model(jnp.asarray(tokens))[0])
    assert ours.shape == ref.shape
    assert np.max(np.abs(ours - ref)) <= 1e-4


def test_export_is_bit_identical(imported, tmp_path, capsys):
    _, hf_model, _, run = imported
    out = tmp_path / "exported"
    assert main(["export-hf", "--run", str(run), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert (out / "tokenizer.model").read_bytes() == FAKE_TOKENIZER
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(hf_model)
    original, again = hf_model.state_dict(), reloaded.state_dict()
    assert original.keys() == again.keys()
    for name, tensor in original.items():
        assert torch.equal(again[name], tensor), name
    # A second export into the same directory would mix files: refused.
    assert main(["export-hf", "--run", str(run), "--out", str(out)]) == 2


def test_refuses_run_with_checkpoints_and_missing_dir(imported, tmp_path, capsys):
    _, _, hf_dir, run = imported
    capsys.readouterr()
    assert main(["import-hf", str(hf_dir), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run) in err and "already has checkpoints" in err and err.count("\n") == 1
    assert main(["import-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "runs" / "x")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_export_refuses_config_hf_cannot_run(imported, tmp_path, capsys):
    kind, _, _, run = imported
    if kind != "mixtral":
        pytest.skip("the unexportable setting is a MoE one")
    copy = tmp_path / "runs" / "capacity"
    shutil.copytree(run, copy)
    cfg = load_config(copy / "config.yaml")
    cfg.model.moe.dispatch = "capacity"  # drops tokens: no HF equivalent
    save_config(cfg, copy / "config.yaml")
    capsys.readouterr()
    assert main(["export-hf", "--run", str(copy), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model.moe.dispatch" in err and err.count("\n") == 1


def test_train_init_from_loads_imported_weights(imported):
    """The trainer's own init_from path (fresh sharded state, then `_load_init_weights`) accepts
    the imported run. Trainer.__init__ also trains / loads a tokenizer and sets up data, which
    this check does not need, so only the attributes `_fresh_state` reads are set."""
    from mixtral_jax.parallel.mesh import make_mesh
    from mixtral_jax.training.trainer import Trainer
    from mixtral_jax.training.program import build_program

    _, _, _, run = imported
    cfg = load_config(run / "config.yaml", [f"train.init_from={run}", "run.name=finetune", "mesh.fsdp=2"])
    trainer = object.__new__(Trainer)
    trainer.cfg = cfg
    trainer.init_state = build_program(cfg, make_mesh(cfg.mesh)).init_state
    state = trainer._fresh_state()
    model, _, _ = load_run_model(run)
    want = {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    got = {k: np.asarray(jax.device_get(v[...])) for k, v in nnx.to_flat_state(state["params"])}
    assert got.keys() == want.keys()
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    # ...and sharded like a fresh state on this mesh (fsdp=2), not on the device it was saved from.
    shardings = {len(v[...].sharding.device_set) for _, v in nnx.to_flat_state(state["params"])}
    assert max(shardings) == len(jax.devices())
