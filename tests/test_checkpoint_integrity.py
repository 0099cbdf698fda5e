"""Same-size checkpoint damage, made for real: bytes overwritten (0xFF, 0x00, random) at the
start, middle and end of every kind of file orbax writes, single bit flips, files swapped between
steps, in the newest and in older steps. Each is caught (by the digests, or by orbax itself) and
the run falls back to the newest good step with an uninterrupted run's losses; damage to a file
restore never reads cannot change what is trained on, and is checked to change nothing. Also a
checkpoint sharded over 8 devices restored onto other layouts, weights-only (import-hf /
upcycle) checkpoints, eval, `mixtral-jax verify` and checkpoints saved before digests existed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from meshes import mesh_of, one_device_trainers_with_compile_cache
from mixtral_jax import cli
from mixtral_jax.config import ConfigError, load_config
from mixtral_jax.interop.convert import write_weights_run
from mixtral_jax.training.checkpoint import Checkpointer, complete_steps
from mixtral_jax.training.errors import RunError
from mixtral_jax.training.evaluate import load_run_model
from mixtral_jax.training.metrics import read_metrics
from mixtral_jax.training.recovery import (DamagedCheckpoint, _quiet_async_failures, _restore, check_files,
                                           check_shapes, restore_latest_good)
from mixtral_jax.training.trainer import Trainer
from mixtral_jax.training.program import build_program

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=8",
        "model.hidden_dim=64", "model.moe.num_experts=4", "data.seq_len=32", "data.batch_size=8",
        "optim.warmup_steps=2", "logging.progress=false", "logging.wandb=off", "model.moe.bias_update_rate=0.01",
        "train.log_every=1", "train.checkpoint_every=1", "train.eval_batches=1", "train.steps=4",
        "train.keep_checkpoints=4", "train.eval_every=4"]
# Files restore never reads (orbax's commit markers, the per-process OCDBT manifest it merged
# into the item's own, shardings when the restore names its own): damage there changes nothing.
UNREAD = ("commit_success.txt", "ocdbt.process_0/manifest.ocdbt", "_sharding", "array_metadatas/process_0")


@pytest.fixture(scope="module", autouse=True)
def _one_device_and_compile_cache(tmp_path_factory):
    with one_device_trainers_with_compile_cache(str(tmp_path_factory.mktemp("xla_cache"))):
        yield


def _cfg(out_dir: Path, name: str, *extra: str):
    return load_config("quickstart", [f"run.out_dir={out_dir}", f"run.name={name}", *TINY, *extra])


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_cache) -> Path:
    """An uninterrupted 4-step run with a checkpoint at every step (router biases trained too)."""
    cfg = _cfg(tmp_path_factory.mktemp("trained"), "base")
    Trainer(cfg).fit()
    return cfg.run_dir


@pytest.fixture(scope="module")
def saved(trained):
    """What each step holds, restored before any damage: (target, {step: (state, data, meta)})."""
    target = build_program(_cfg(trained.parent, trained.name), mesh_of({"data": 1})).sharded_shapes()
    ckpt = Checkpointer(trained / "checkpoints")
    states = {s: jax.device_get(ckpt.restore(s, target)) for s in complete_steps(trained / "checkpoints")}
    ckpt.close()
    return target, states


def _overwrite(path: Path, where: str, garbage: str, seed: int = 0) -> int:
    data = bytearray(path.read_bytes())
    n = max(1, min(64, len(data) // 4))
    start = {"start": 0, "middle": (len(data) - n) // 2, "end": len(data) - n}[where]
    fill = {"ff": b"\xff" * n, "00": b"\x00" * n,
            "random": np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()}[garbage]
    if fill == bytes(data[start:start + n]):  # already those bytes: no damage to test
        fill = bytes(b ^ 0x5A for b in fill)
    data[start:start + n] = fill
    path.write_bytes(bytes(data))
    return start


def _bump_digit(path: Path) -> None:
    text = path.read_text()
    i = max(i for i, c in enumerate(text) if c.isdigit())
    path.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])


def _flip_bit(path: Path, seed: int) -> int:
    data = bytearray(path.read_bytes())
    bit = int(np.random.default_rng(seed).integers(len(data) * 8))
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))
    return bit // 8


def _referenced_end(item_dir: Path, data_file: Path) -> int:
    """Where the last value the item's (merged) OCDBT tree points to ends in `data_file`: the
    bytes after it hold the per-process tree node the merge superseded, which no read visits."""
    import re

    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "file", "path": f"{item_dir}/"}).result()
    root = ts.ocdbt.dump(kv).result()["versions"][-1]["root"]["location"]
    ends = [int(m.group(2)) + int(m.group(3)) for e in ts.ocdbt.dump(kv, root).result()["entries"]
            if (m := re.match(r"value:(.*):(\d+):(\d+)$", e.get("indirect_value", "")))
            and m.group(1).replace("/:", "/") == str(data_file.relative_to(item_dir))]
    return max(ends)


def _never_read(kind: str, path: Path, start: int, original: bytes) -> bool:
    """Damage restore cannot see: a file it does not open, the superseded tail of a chunk file, or
    step metadata that still parses with the same items (only timestamps differ)."""
    if any(kind.endswith(u) for u in UNREAD):
        return True
    if kind.endswith("chunks"):
        return start >= _referenced_end(path.parent.parent.parent, path)
    if kind == "_CHECKPOINT_METADATA":
        try:
            handlers = json.loads(path.read_text())["item_handlers"]
        except (ValueError, KeyError, TypeError):
            return False
        return handlers == json.loads(original)["item_handlers"]
    return False


def _files(step_dir: Path) -> dict[str, Path]:
    """One file of each kind orbax (and the digests) write in a step, by a stable name."""
    def biggest(folder: Path) -> Path:
        return max(folder.iterdir(), key=lambda p: p.stat().st_size)

    kinds = {"weights chunks": biggest(step_dir / "weights/ocdbt.process_0/d"),
             "trainer chunks": biggest(step_dir / "trainer/ocdbt.process_0/d"),
             "weights btree": next((step_dir / "weights/d").iterdir()),
             "trainer btree": next((step_dir / "trainer/d").iterdir())}
    for rel in ("weights/manifest.ocdbt", "weights/_METADATA", "trainer/_METADATA", "data/metadata",
                "meta/metadata", "_CHECKPOINT_METADATA", "digests/process_0.json", *(f"weights/{u}" for u in UNREAD)):
        kinds[rel] = step_dir / rel
    return kinds


def _outcome(ckpt: Checkpointer, target: dict, step: int, expected: tuple) -> str:
    """detected (the restore path refuses the step) / unchanged (restores exactly what was saved) /
    WRONG (restores something else: what must never happen)."""
    step_dir = ckpt.directory / str(step)
    try:
        with _quiet_async_failures():
            check_files(step_dir, step)
            check_shapes(step_dir, target, step)
            got = jax.device_get(_restore(ckpt, step, step_dir, target))
    except DamagedCheckpoint:
        return "detected"
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)))
    return "unchanged" if same and jax.tree.structure(got) == jax.tree.structure(expected) else "WRONG"


def test_same_size_damage_in_every_file_kind_is_caught_or_changes_nothing(trained, saved, tmp_path):
    target, states = saved
    run_dir = shutil.copytree(trained, tmp_path / "run")
    ckpt, results, cases = Checkpointer(run_dir / "checkpoints"), {}, 0
    damages = [("start", "ff"), ("middle", "00"), ("end", "random"), ("flip", 1)]
    for k, (kind, _) in enumerate(_files(run_dir / "checkpoints/4").items()):
        unread_kind = any(kind.endswith(u) for u in UNREAD)  # fewer cases where no damage can matter
        for d, (where, how) in enumerate(damages[::2] if unread_kind else damages):
            step = (4, 2)[(k + d) % 2]  # the newest and an older step alike
            path = _files(run_dir / f"checkpoints/{step}")[kind]
            original = path.read_bytes()
            start = _flip_bit(path, k * 10 + d) if where == "flip" else _overwrite(path, where, how, k * 10 + d)
            unread = _never_read(kind, path, start, original)
            results[(kind, where, how, step)] = _outcome(ckpt, target, step, states[step]), unread
            path.write_bytes(original)
            cases += 1
    ckpt.close()
    wrong = {case: r for case, (r, _) in results.items() if r == "WRONG"}
    assert not wrong and cases == len(results) >= 50, wrong  # nothing damaged is ever restored
    missed = {case: r for case, (r, unread) in results.items() if r == "unchanged" and not unread}
    assert not missed, missed  # damage to bytes restore reads is always caught
    assert sum(r == "detected" for r, _ in results.values()) >= 35


def test_files_swapped_between_steps_are_caught(trained, saved, tmp_path):
    target, states = saved
    run_dir = shutil.copytree(trained, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    for rel in ("data/metadata", "weights"):  # one JSON item, one whole array item (self-consistent)
        a, b = ckpts / "3" / rel, ckpts / "4" / rel
        a.rename(a.with_name("swap")), b.rename(a), a.with_name("swap").rename(b)
    ckpt = Checkpointer(ckpts)
    assert _outcome(ckpt, target, 4, states[4]) == _outcome(ckpt, target, 3, states[3]) == "detected"
    ckpt.close()
    assert cli.main(["verify", "--run", str(run_dir), "--step", "4"]) == 1


def test_damaged_newest_and_older_steps_are_moved_aside_and_the_run_resumes_exactly(trained, tmp_path, capsys):
    run_dir = shutil.copytree(trained, tmp_path / "damaged")
    _overwrite(_files(run_dir / "checkpoints/4")["weights chunks"], "middle", "ff")
    _flip_bit(_files(run_dir / "checkpoints/3")["trainer chunks"], 7)
    summary = Trainer(_cfg(tmp_path, "damaged")).fit()
    out = capsys.readouterr().out
    assert "checkpoint step 4 is damaged (weights/" in out and "moved it aside to 4.corrupt" in out, out
    assert "checkpoint step 3 is damaged (trainer/" in out and f"resumed {run_dir} at step 2" in out, out
    assert (run_dir / "checkpoints/4.corrupt").is_dir() and (run_dir / "checkpoints/3.corrupt").is_dir()
    assert summary["steps"] == 4 and _losses(run_dir) == _losses(trained)  # steps 3-4 redone exactly
    assert cli.main(["verify", "--run", str(run_dir)]) == 0


def test_no_good_step_is_one_error_naming_every_bad_array_and_nothing_changes(trained, tmp_path, capsys):
    run_dir = shutil.copytree(trained, tmp_path / "ruined")
    for step in (1, 2, 3, 4):
        _bump_digit(run_dir / f"checkpoints/{step}/meta/metadata")  # the cost clock, still valid JSON
        _flip_bit(_files(run_dir / f"checkpoints/{step}")["weights chunks"], step)
    files = lambda: {p: p.read_bytes() for p in [*(run_dir / "checkpoints").rglob("*"), run_dir / "metrics.jsonl"]  # noqa: E731
                     if p.is_file()}
    before = files()
    with pytest.raises(RunError) as err:
        Trainer(_cfg(tmp_path, "ruined")).fit()
    message = str(err.value)
    assert "\n" not in message and message.startswith("no usable checkpoint in "), message
    for step in (1, 2, 3, 4):
        assert f"step {step}: " in message
    assert "meta" in message and "digest mismatch: params." in message, message
    assert files() == before and complete_steps(run_dir / "checkpoints") == [1, 2, 3, 4]
    assert cli.main(["verify", "--run", str(run_dir), "--json"]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["damaged"] == [1, 2, 3, 4] and not report["ok"], report
    assert any("meta" in s["arrays"] for s in report["steps"]), report  # a flip zstd rejects is named by orbax


def test_eval_and_verify_name_the_step_array_and_file(trained, tmp_path, capsys):
    run_dir = shutil.copytree(trained, tmp_path / "evaluated")
    ckpts = run_dir / "checkpoints"
    (ckpts / "3/weights").rename(ckpts / "swap"), (ckpts / "4/weights").rename(ckpts / "3/weights")
    (ckpts / "swap").rename(ckpts / "4/weights")  # valid weights, of the wrong step: only digests see it
    with pytest.raises(RunError, match=r"checkpoint step 4 is damaged \(weights/.*: digest mismatch: .*"
                                       r"params\.blocks\.attn\.wk"):
        load_run_model(run_dir)  # eval, generate and export-hf load through here
    assert cli.main(["verify", "--run", str(run_dir)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[1].strip() for line in lines[-4:]] == ["ok", "ok", "damaged", "damaged"], lines
    assert lines[-1].startswith("step 4: damaged: weights/") and "params.embed" in lines[-1], lines
    assert cli.main(["verify", "--run", str(run_dir), "--step", "2"]) == 0


def test_checkpoints_without_digests_load_with_a_note_but_deleted_digests_are_damage(trained, saved, tmp_path,
                                                                                      capsys):
    run_dir = shutil.copytree(trained, tmp_path / "old")
    step_dir = run_dir / "checkpoints/4"
    shutil.rmtree(step_dir / "digests")
    ckpt = Checkpointer(run_dir / "checkpoints")
    with pytest.raises(DamagedCheckpoint, match=r"digests/ \(missing, though the step was saved with digests"):
        _restore(ckpt, 4, step_dir, saved[0])
    meta = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())  # as orbax wrote it before digests
    del meta["item_handlers"]["digests"]
    (step_dir / "_CHECKPOINT_METADATA").write_text(json.dumps(meta))
    step, *_, notes = restore_latest_good(ckpt, saved[0])
    ckpt.close()
    assert step == 4 and notes == ["note: checkpoint step 4 has no digests (saved before checksums existed), so its "
                                   "content cannot be verified"]
    assert cli.main(["verify", "--run", str(run_dir), "--step", "4"]) == 0
    assert "step 4: unverifiable: no digests" in capsys.readouterr().out


def test_weights_only_checkpoints_of_import_and_upcycle_carry_digests(trained, saved, tmp_path):
    state = saved[1][4][0]
    cfg = _cfg(tmp_path, "imported")
    write_weights_run(cfg.run_dir, cfg, state["params"], state["model_state"], {"imported_from": "test"}, None)
    assert (cfg.run_dir / "checkpoints/0/digests/process_0.json").is_file()
    model, _, step = load_run_model(cfg.run_dir)
    assert step == 0
    _flip_bit(_files_of(cfg.run_dir / "checkpoints/0/weights"), 3)
    with pytest.raises(RunError, match=r"checkpoint step 0 is damaged \(weights/.*digest mismatch"):
        load_run_model(cfg.run_dir)
    assert cli.main(["verify", "--run", str(cfg.run_dir)]) == 1


def test_a_checkpoint_sharded_over_8_devices_verifies_onto_any_layout(tmp_path):
    eight, four = mesh_of({"fsdp": 8}), mesh_of({"fsdp": 4})
    rng = np.random.default_rng(0)

    def state_on(mesh, spec_w, spec_b) -> dict:
        return {"params": {"w": jax.device_put(rng.standard_normal((4096, 64)).astype(np.float32),
                                               NamedSharding(mesh, spec_w)),
                           "b": jax.device_put(jnp.arange(8, dtype=jnp.bfloat16), NamedSharding(mesh, spec_b))},
                "model_state": {"bias": jnp.zeros(4)}, "step": jnp.int32(1)}

    ckpt = Checkpointer(tmp_path / "ckpt")
    for step in (1, 2):
        ckpt.save(step, state_on(eight, P("fsdp", None), P()), {"pos": step}, {"clock_seconds": 1.0 * step})
    ckpt.wait()
    record = json.loads((tmp_path / "ckpt/2/digests/process_0.json").read_text())
    assert len(record["arrays"]["weights"]["params.w"]["shards"]) == 8  # one digest per shard, by global index
    layouts = [state_on(eight, P("fsdp", None), P()), state_on(four, P(None, "fsdp"), P("fsdp")),
               jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_on(eight, P(), P()))]
    expected = jax.device_get(ckpt.restore(2, layouts[0])[0])
    for target in layouts:  # same, transposed-finer and single-device layouts all verify
        got = jax.device_get(ckpt.restore(2, target)[0])
        jax.tree.map(np.testing.assert_array_equal, got, expected)
    ckpt.close()
    _overwrite(_files_of(tmp_path / "ckpt/2/weights"), "middle", "ff")
    for target in layouts:
        ckpt = Checkpointer(tmp_path / "ckpt")
        step, state, data, meta, notes = restore_latest_good(ckpt, target, move_aside=False)
        ckpt.close()
        assert step == 1 and data == {"pos": 1} and "checkpoint step 2 is damaged (weights/" in notes[0], notes


def _files_of(item_dir: Path) -> Path:
    return max((item_dir / "ocdbt.process_0/d").iterdir(), key=lambda p: p.stat().st_size)


def _tree_files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_init_from_a_damaged_checkpoint_is_one_complete_line_and_nothing_is_trained(trained, saved, tmp_path):
    source = shutil.copytree(trained, tmp_path / "source")
    ckpts = source / "checkpoints"
    (ckpts / "3/weights").rename(ckpts / "swap"), (ckpts / "4/weights").rename(ckpts / "3/weights")
    (ckpts / "swap").rename(ckpts / "4/weights")  # every weight of step 4 is now another step's
    before = _tree_files(source)
    cfg = _cfg(tmp_path, "finetune", f"train.init_from={source}")
    with pytest.raises(RunError) as err:
        Trainer(cfg).fit()
    message = str(err.value)
    assert "\n" not in message and message.startswith("train.init_from: checkpoint step 4 is damaged (weights/"), message
    changed = [name for name, a, b in zip(_weight_names(saved[1][4][0]), *(jax.tree.leaves(
        {k: saved[1][s][0][k] for k in ("params", "model_state")}) for s in (3, 4))) if not np.array_equal(a, b)]
    assert len(changed) > 10 and len(message) > 400  # longer than the old cut at 200 characters
    listed = message.split("digest mismatch: ")[1].split(")")[0].split(", ")
    assert listed == changed, (listed, changed)  # every bad array, in full
    assert f"`mixtral-jax verify --run {source}` checks every step" in message
    assert isinstance(err.value.__cause__, RunError)  # the damaged step's own error stays chained
    assert _tree_files(source) == before  # nothing moved aside in another run
    assert complete_steps(cfg.run_dir / "checkpoints") == [] and not (cfg.run_dir / "summary.json").exists()
    assert not _losses(cfg.run_dir)  # nothing trained


def test_init_from_a_checkpoint_of_another_shape_stays_a_config_error(trained, tmp_path):
    cfg = _cfg(tmp_path, "reshaped", f"train.init_from={trained}", "model.hidden_dim=96")
    with pytest.raises(ConfigError, match=r"checkpoint .*/4 does not match this model config \(Requested shape"):
        Trainer(cfg).fit()  # orbax's shape error is a config mismatch, not damage


def _weight_names(state: dict) -> list[str]:
    from mixtral_jax.training.digests import _leaves

    return [name for name, _ in _leaves({k: state[k] for k in ("params", "model_state")})]


def _zero_first_chunk(run_dir: Path) -> Path:
    """Zero the start of the newest step's biggest weights chunk file: the first chunk's zstd frame
    header is gone, so orbax itself refuses to decode it (the digests never get to look)."""
    chunk = _files_of(run_dir / f"checkpoints/{max(complete_steps(run_dir / 'checkpoints'))}/weights")
    data = bytearray(chunk.read_bytes())
    data[:256] = bytes(256)
    chunk.write_bytes(bytes(data))
    return chunk


def test_damage_orbax_rejects_is_one_line_naming_step_array_and_file_in_eval_generate_and_export(trained, tmp_path,
                                                                                                  capsys):
    trained_copy = shutil.copytree(trained, tmp_path / "undecodable")
    # export-hf takes models HF can express (no router bias): a weights-only run of such a model
    plain = _cfg(tmp_path, "plain", "model.moe.bias_update_rate=0")
    state = build_program(plain, mesh_of({"data": 1})).init_state()
    write_weights_run(plain.run_dir, plain, state["params"], state["model_state"], {"imported_from": "test"}, None)
    chunks = {run: _zero_first_chunk(run) for run in (trained_copy, plain.run_dir)}
    with pytest.raises(RunError) as err:
        load_run_model(trained_copy)
    assert err.value.__cause__ is not None and not isinstance(err.value.__cause__, RunError)  # orbax's, for --debug
    assert "ZSTD" in str(err.value.__cause__.__cause__ or err.value.__cause__)
    out_dir = tmp_path / "hf"
    before = {run: _tree_files(run) for run in chunks}
    capsys.readouterr()
    for verb, run, extra in (("eval", trained_copy, []), ("generate", trained_copy, ["--prompt", "def"]),
                             ("export-hf", plain.run_dir, ["--out", str(out_dir)])):
        step = max(complete_steps(run / "checkpoints"))
        assert cli.main([verb, "--run", str(run), *extra]) == 2
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
        assert lines[0].startswith(f"mixtral-jax {verb}: error: checkpoint step {step} is damaged "
                                   f"(weights/ocdbt.process_0/d/{chunks[run].name}: reading params."), lines[0]
        assert "ZSTD" in lines[0] and f"`mixtral-jax verify --run {run}` checks every step" in lines[0], lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir())  # export wrote nothing
    assert {run: _tree_files(run) for run in chunks} == before  # nothing moved or changed
    assert cli.main(["verify", "--run", str(trained_copy), "--step", "4"]) == 1
    assert f"step 4: damaged: weights/ocdbt.process_0/d/{chunks[trained_copy].name} (reading params." in \
        capsys.readouterr().out
