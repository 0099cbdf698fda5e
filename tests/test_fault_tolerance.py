"""Fault tolerance of training runs, each failure made to happen for real: preemption signals and
`kill -9` of CLI training processes, damaged checkpoints, non-finite steps, a full disk, two trainers
on one run dir, a tokenizer larger than the model. For speed: one CPU device (a one-device mesh in
process) and a persistent XLA cache (a cached executable computes what a fresh compile would)."""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from meshes import mesh_of, one_device_trainers_with_compile_cache
from orbax.checkpoint._src.handlers import json_checkpoint_handler  # to fail a background write
from mixtral_jax.config import ConfigError, load_config
from mixtral_jax.data.tokenizer import load_or_train_tokenizer
from mixtral_jax.training import trainer as trainer_module
from mixtral_jax.training.checkpoint import Checkpointer, complete_steps
from mixtral_jax.training.errors import RunError
from mixtral_jax.training.metrics import read_metrics
from mixtral_jax.training.preflight import check_token_ids
from mixtral_jax.training.recovery import TMP_MARKER, restore_latest_good
from mixtral_jax.training.run_lock import RunLock
from mixtral_jax.training.trainer import Trainer, global_batch
from mixtral_jax.training.program import build_program

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=8",
        "model.hidden_dim=64", "model.moe.num_experts=4", "data.seq_len=32", "data.batch_size=8",
        "optim.warmup_steps=2", "logging.progress=false", "logging.wandb=off"]
EVERY_STEP = ["train.log_every=1", "train.checkpoint_every=1", "train.eval_batches=1"]
STEPS = 16  # subprocess runs: log and checkpoint every step, so asynchronous writes happen all the time
RUN = [*TINY, *EVERY_STEP, f"train.steps={STEPS}", f"train.eval_every={STEPS}", "train.keep_checkpoints=3"]
TRAINED = [*EVERY_STEP, "train.steps=4", "train.keep_checkpoints=4", "train.eval_every=4"]  # in-process run


@pytest.fixture(scope="module", autouse=True)
def _fast_in_process_trainers(tmp_path_factory):
    with one_device_trainers_with_compile_cache(str(tmp_path_factory.mktemp("xla_cache_in_process"))):
        yield


def _cfg(out_dir: Path, name: str, *extra: str):
    return load_config("quickstart", [f"run.out_dir={out_dir}", f"run.name={name}", *TINY, *extra])


@pytest.fixture(scope="module")
def cli(corpus_cache, tmp_path_factory):
    """start(run_dir) -> Popen of `mixtral-jax train` on that run dir (output in run_dir.log)."""
    env = dict(os.environ, MIXTRAL_JAX_CACHE=str(corpus_cache), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

    def start(run_dir: Path, *extra: str) -> subprocess.Popen:
        args = [sys.executable, "-m", "mixtral_jax.cli", "train", "--config", "configs/quickstart.yaml",
                f"run.out_dir={run_dir.parent}", f"run.name={run_dir.name}", *RUN, *extra]
        with open(f"{run_dir}.log", "a") as log:
            proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            proc.log_path, proc.log_start = Path(log.name), log.tell()  # type: ignore[attr-defined]
        return proc

    return start


def _output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()[proc.log_start:]  # type: ignore[attr-defined]


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    return proc.wait(timeout=180), _output(proc)  # (exit status, its output)


def _wait_until(proc: subprocess.Popen, condition, timeout: float = 120, poll: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode} early:\n{_output(proc)[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{_output(proc)[-3000:]}"
        time.sleep(poll)


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def _trained_past(run_dir: Path, step: int, started: float = 0.0) -> bool:
    """A step > `step` is logged, after `started` (a new process first truncates a killed one's records)."""
    path = run_dir / "metrics.jsonl"
    return path.exists() and path.stat().st_mtime > started and max(_losses(run_dir), default=0) > step


@pytest.fixture(scope="module")
def reference(cli, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the same command run without interruption."""
    run_dir = tmp_path_factory.mktemp("ref") / "straight"
    rc, out = _finish(cli(run_dir))
    assert rc == 0 and sorted(_losses(run_dir)) == list(range(1, STEPS + 1)), out[-3000:]
    return _losses(run_dir)


def test_sigterm_and_sigint_checkpoint_at_the_step_boundary_and_resume_exactly(cli, reference, tmp_path):
    run_dir, stopped_at = tmp_path / "preempted", 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = cli(run_dir)
        _wait_until(proc, lambda: _trained_past(run_dir, stopped_at + 1))
        proc.send_signal(sig)
        rc, out = _finish(proc)
        match = re.search(rf"{sig.name}: stopped after step (\d+), checkpoint saved; run the same command again", out)
        assert rc == 130 and match, out[-3000:]
        stopped_at = int(match.group(1))
        assert stopped_at < STEPS and complete_steps(run_dir / "checkpoints")[-1] == stopped_at
        assert max(_losses(run_dir)) == stopped_at
    rc, out = _finish(cli(run_dir))
    assert rc == 0 and f"resumed {run_dir} at step {stopped_at}" in out, out[-3000:]
    assert _losses(run_dir) == reference  # bit-identical per-step losses


def test_kill_9_at_random_moments_resumes_from_the_last_complete_checkpoint(cli, reference, tmp_path):
    run_dir, ckpts = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    rng, kills, expect_resume = random.Random(int(os.environ.get("FAULT_SEED", "0"))), [], None

    def kill(proc: subprocess.Popen, moment: str) -> None:
        nonlocal expect_resume
        assert proc.poll() is None, f"finished before the kill ({moment}):\n{_output(proc)[-3000:]}"
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait(timeout=60)
        kills.append(moment)
        expect_resume = (complete_steps(ckpts) or [None])[-1]

    def check_restart(out: str, resume_from: int | None) -> None:  # None: no checkpoint yet, starts over
        """The run after a kill: nothing damaged, the lock taken over, resumed where expected."""
        assert "damaged" not in out and "took over the stale lock" in out, out[-3000:]
        resumed = f"resumed {run_dir} at step {resume_from}" if resume_from else "resumed"
        assert (resumed in out) == bool(resume_from), out[-3000:]

    # 1. mid-write: its temporary dir exists (retried if the write committed before the kill landed)
    leftover = lambda: [p for p in os.listdir(ckpts) if TMP_MARKER in p]  # noqa: E731
    for _ in range(4):
        started, proc = time.time(), cli(run_dir)
        _wait_until(proc, lambda: _trained_past(run_dir, expect_resume or 0, started))
        _wait_until(proc, leftover, poll=0.0005)
        kill(proc, "async write in flight")
        if leftover():
            break
    assert leftover(), "no kill landed during a checkpoint write"
    # 2. a random moment while training
    resume_from, started, proc = expect_resume, time.time(), cli(run_dir)
    _wait_until(proc, lambda: _trained_past(run_dir, resume_from or 0, started))
    time.sleep(rng.uniform(0.0, 1.0))
    out = _output(proc)
    kill(proc, "training")
    check_restart(out, resume_from)
    assert "incomplete checkpoint write" in out, out[-3000:]  # kill 1's temporary dir was removed
    # 3. a random moment from process start (imports, restore, compile or training)
    proc = cli(run_dir)
    time.sleep(rng.uniform(0.5, 6.0))
    kill(proc, "anywhere")
    resume_from, (rc, out) = expect_resume, _finish(cli(run_dir))
    assert rc == 0, out[-3000:]
    check_restart(out, resume_from)
    assert len(kills) >= 3 and _losses(run_dir) == reference, kills


def test_second_trainer_on_a_run_dir_is_refused_naming_the_holder(cli, tmp_path, corpus_cache):
    run_dir, lock_file = tmp_path / "shared", tmp_path / "shared" / ".lock"
    holder = cli(run_dir, "train.steps=100000", "train.checkpoint_every=100000")
    try:
        _wait_until(holder, lambda: lock_file.is_file() and str(holder.pid) in lock_file.read_text())
        with pytest.raises(ConfigError, match=rf"in use by another trainer \(PID {holder.pid} on host "):
            Trainer(_cfg(tmp_path, "shared", "train.steps=3"))
        second = subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "train", "--config", "quickstart",
                                 f"run.out_dir={tmp_path}", "run.name=shared", *RUN], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
        assert second.returncode == 2 and f"PID {holder.pid}" in second.stderr, second.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait(timeout=60)
    lock = RunLock(run_dir).acquire()  # the kernel dropped the dead holder's flock
    assert f"left by PID {holder.pid}" in lock.note
    lock.release()
    assert RunLock(run_dir).acquire().note is None  # a clean release leaves no stale holder


def test_nonfinite_step_is_skipped_in_the_jitted_step_and_counted():
    cfg, mesh = load_config("quickstart", [*TINY, "model.vocab_size=128", "data.seq_len=16",
                                           "model.moe.bias_update_rate=0.01"]), mesh_of({"data": 1})
    program, to_device = build_program(cfg, mesh), trainer_module.batch_sharding(mesh)
    tokens = np.random.default_rng(0).integers(3, 128, size=(8, 17)).astype(np.int32)
    good = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((8, 16), np.int32),
            "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)), "loss_mask": np.ones((8, 16), np.float32)}
    bad = dict(good, loss_mask=good["loss_mask"].copy())
    bad["loss_mask"][0, 5] = np.nan  # one NaN weight makes the loss and every gradient NaN
    state, metrics = program.train_step(program.init_state(), global_batch(good, to_device))
    snapshot = jax.device_get({k: state[k] for k in ("params", "opt_state", "model_state")})
    for streak in (1, 2):  # two bad steps in a row: nothing moves (router biases included), the counters do
        state, metrics = program.train_step(state, global_batch(bad, to_device))
        assert int(metrics["nonfinite_skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
        jax.tree.map(np.testing.assert_array_equal, jax.device_get({k: state[k] for k in snapshot}), snapshot)
        assert int(state["step"]) == 1 + streak and int(state["nonfinite"]["streak"]) == streak
        assert int(state["nonfinite"]["total"]) == streak
    state, metrics = program.train_step(state, global_batch(good, to_device))  # a good step resets the streak
    assert int(metrics["nonfinite_skipped"]) == 0 and np.isfinite(float(metrics["loss"]))
    assert int(state["nonfinite"]["streak"]) == 0 and int(state["nonfinite"]["total"]) == 2
    moved = zip(jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(snapshot["params"]))
    assert not all(np.array_equal(a, b) for a, b in moved)


class _Poisoned:
    """The trainer's data iterator with NaN loss masks on the given (1-based) steps."""

    def __init__(self, inner, bad_steps):
        self.inner, self.bad, self.calls = inner, set(bad_steps), 0
        self.get_state, self.set_state = inner.get_state, inner.set_state

    def __next__(self):
        batch, self.calls = next(self.inner), self.calls + 1
        return dict(batch, loss_mask=np.full_like(batch["loss_mask"], np.nan)) if self.calls in self.bad else batch


def _poison(monkeypatch, bad_steps) -> None:
    real = trainer_module.make_train_iterator
    monkeypatch.setattr(trainer_module, "make_train_iterator", lambda *a, **k: _Poisoned(real(*a, **k), bad_steps))


def _restore(run_dir: Path, program, step: int | None = None) -> tuple:
    """(step, state, recovery notes) of checkpoint `step`, else of the newest good one."""
    ckpt, target = Checkpointer(run_dir / "checkpoints"), program.sharded_shapes()
    step, state, *_, notes = (step, ckpt.restore(step, target)[0], []) if step else restore_latest_good(ckpt, target)
    ckpt.close()
    return step, jax.device_get(state), notes


def test_skip_policy_drops_bad_updates_then_stops_after_max_consecutive(tmp_path, corpus_cache, monkeypatch):
    _poison(monkeypatch, {3, 5, 6})  # one bad step alone, then two in a row
    trainer = Trainer(_cfg(tmp_path, "skip", *EVERY_STEP, "train.steps=8", "train.keep_checkpoints=10",
                           "train.eval_every=8", "train.on_nonfinite=skip", "train.max_consecutive_nonfinite=2"))
    with pytest.raises(RunError, match=r"at step 6 \(2 consecutive .*max_consecutive_nonfinite=2.*last checkpoint "
                                       r"\(step 5\) is intact"):
        trainer.fit()
    records = {r["step"]: r for r in read_metrics(trainer.run_dir) if "loss" in r}
    assert [r["nonfinite_skipped"] for _, r in sorted(records.items())] == [0, 0, 1, 0, 1]
    assert records[3]["loss"] == "nan"  # logged as is; the skipped update is what matters
    assert complete_steps(trainer.run_dir / "checkpoints") == [1, 2, 3, 4, 5]  # a skipped step is still good
    states = {s: _restore(trainer.run_dir, trainer.program, s)[1] for s in (2, 3, 4, 5)}
    for key in ("params", "opt_state", "model_state"):  # the skipped steps changed nothing
        jax.tree.map(np.testing.assert_array_equal, states[3][key], states[2][key])
        jax.tree.map(np.testing.assert_array_equal, states[5][key], states[4][key])
    assert not np.array_equal(jax.tree.leaves(states[4]["params"])[0], jax.tree.leaves(states[3]["params"])[0])
    assert [int(states[s]["nonfinite"]["streak"]) for s in (2, 3, 4, 5)] == [0, 1, 0, 1]
    assert int(states[5]["nonfinite"]["total"]) == 2


def test_stop_policy_stops_at_the_first_bad_step_and_keeps_the_last_good_checkpoint(tmp_path, corpus_cache,
                                                                                    monkeypatch):
    # Logged every 5 steps, checkpointed every 2: the bad step 3 is caught before step 4's save.
    _poison(monkeypatch, {3})
    trainer = Trainer(_cfg(tmp_path, "stop", "train.steps=6", "train.log_every=5", "train.checkpoint_every=2",
                           "train.eval_every=6", "train.eval_batches=1", "train.on_nonfinite=stop"))
    with pytest.raises(RunError, match=r"non-finite loss or gradients at step 3 .*last checkpoint \(step 2\)"):
        trainer.fit()
    step, state, notes = _restore(trainer.run_dir, trainer.program)
    assert step == 2 and notes == [] and complete_steps(trainer.run_dir / "checkpoints") == [2]
    assert int(state["nonfinite"]["total"]) == 0 and all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_cache) -> Path:
    """A finished 4-step run with a checkpoint at every step."""
    cfg = _cfg(tmp_path_factory.mktemp("trained"), "base", *TRAINED)
    Trainer(cfg).fit()
    return cfg.run_dir


def _truncate_weights(step_dir: Path) -> Path:
    """Cut the weights' merged OCDBT tree file in half (a write the disk lost the end of)."""
    path = next((step_dir / "weights" / "d").iterdir())
    os.truncate(path, path.stat().st_size // 2)
    return path


def test_damaged_checkpoints_are_moved_aside_and_the_run_resumes_from_the_last_good_one(trained, tmp_path, capsys):
    run_dir = shutil.copytree(trained, tmp_path / "damaged")
    truncated = _truncate_weights(run_dir / "checkpoints/4")
    (run_dir / "checkpoints/3/data/metadata").unlink()
    summary = Trainer(_cfg(tmp_path, "damaged", *TRAINED)).fit()
    out = capsys.readouterr().out
    assert f"checkpoint step 4 is damaged (weights/d/{truncated.name}" in out, out
    assert "checkpoint step 3 is damaged (data/metadata: missing)" in out and "moved it aside to 3.corrupt" in out
    assert f"resumed {run_dir} at step 2" in out
    assert (run_dir / "checkpoints/4.corrupt").is_dir() and (run_dir / "checkpoints/3.corrupt").is_dir()
    assert summary["steps"] == 4 and _losses(run_dir) == _losses(trained)  # steps 3-4 redone exactly


def test_no_good_checkpoint_stops_naming_the_files_and_changes_nothing(trained, tmp_path):
    run_dir = shutil.copytree(trained, tmp_path / "ruined")
    for step in (1, 2, 3, 4):
        _truncate_weights(run_dir / f"checkpoints/{step}")
    metrics_before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(RunError, match=r"no usable checkpoint in .*step 4: weights/d/\w+.*step 1: weights/d/"):
        Trainer(_cfg(tmp_path, "ruined", "train.steps=4")).fit()
    assert complete_steps(run_dir / "checkpoints") == [1, 2, 3, 4]
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before


def test_checkpoint_of_another_model_config_is_an_error_naming_the_parameter(trained, tmp_path):
    run_dir = shutil.copytree(trained, tmp_path / "other")
    config_before = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"different model or training config: params\.blocks\.ffn\.w_down: "
                                          r"checkpoint \(2, 4, 64, 32\) vs this config \(2, 4, 48, 32\)"):
        Trainer(_cfg(tmp_path, "other", "train.steps=4", "model.hidden_dim=48"))
    assert (run_dir / "config.yaml").read_text() == config_before
    assert complete_steps(run_dir / "checkpoints") == [1, 2, 3, 4]


def test_unwritable_or_full_run_dir_fails_before_compiling(tmp_path, corpus_cache, monkeypatch):
    monkeypatch.setattr(trainer_module, "build_program", lambda *a: pytest.fail("compiled"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match="cannot create run directory"):
        Trainer(_cfg(tmp_path / "a_file", "run"))
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / ".write_probe.0").symlink_to("/dev/full")  # every write to it fails with ENOSPC
    with pytest.raises(ConfigError, match=r"run directory .*full is not writable \(\[Errno 28\] No space left"):
        Trainer(_cfg(tmp_path, "full"))
    assert (tmp_path / "full" / ".lock").read_text() == ""  # released


def test_failed_checkpoint_save_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, corpus_cache,
                                                                                 monkeypatch):
    cfg = _cfg(tmp_path, "enospc", "train.steps=6", "train.checkpoint_every=2", "train.log_every=2",
               "train.eval_every=6", "train.eval_batches=1")
    trainer = Trainer(cfg)
    manager, real_save = trainer.checkpointer.manager, trainer.checkpointer.manager.save

    def save(step, *args, **kwargs):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(step, *args, **kwargs)

    manager.save = save
    with pytest.raises(RunError, match=r"could not save checkpoint step 4 .*\[Errno 28\] No space left on device.*"
                                       r"last complete checkpoint, step 2, is intact"):
        trainer.fit()
    step, state, notes = _restore(cfg.run_dir, trainer.program)
    assert step == 2 and int(state["step"]) == 2 and notes == []

    # The asynchronous half of a save fails instead (as ENOSPC mid-write would): the next save
    # reports that step and the previous one still restores.
    async def no_space(self, item, directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    state = {"params": {"w": jax.numpy.ones(4)}, "model_state": {"b": jax.numpy.zeros(2)}, "step": jax.numpy.int32(1)}
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, state, {"pos": 1}, {})
    ckpt.wait()
    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)
    ckpt.save(2, state, {"pos": 2}, {})  # returns: the write runs in the background
    with pytest.raises(RunError, match=r"could not save checkpoint step 2 .*Errno 28.*step 1, is intact"):
        ckpt.save(3, state, {"pos": 3}, {})
    monkeypatch.undo()
    ckpt.close()
    # The failed write never became a step (its temporary dir goes at the next start: the kill test).
    assert any(TMP_MARKER in p for p in os.listdir(tmp_path / "ckpt")) and complete_steps(tmp_path / "ckpt") == [1]
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert restore_latest_good(ckpt, state)[0] == 1
    ckpt.close()


def test_tokenizer_larger_than_the_model_vocabulary_is_refused_before_training(tmp_path, corpus_cache, monkeypatch):
    monkeypatch.setattr(trainer_module, "load_or_train_tokenizer",  # the session's 4096 pieces, whatever is asked
                        lambda data, size: load_or_train_tokenizer(data, 4096))
    monkeypatch.setattr(trainer_module, "build_program", lambda *a: pytest.fail("compiled"))
    with pytest.raises(ConfigError, match=r"has 4096 pieces but model.vocab_size is 1024"):
        Trainer(_cfg(tmp_path, "small_vocab", "model.vocab_size=1024"))
    with pytest.raises(ConfigError, match=r"token id 1024 \('inputs'\) but model.vocab_size is 1024"):
        check_token_ids({"inputs": np.array([[5, 1024]])}, 1024)
