"""The training loop's hooks (which steps log, evaluate and checkpoint; the guard before a save;
eval off the clocks) driven without a device, and build_program's model seam on a tiny model."""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshes import mesh_of
from mixtral_jax.config import load_config
from mixtral_jax.models.params import path_name
from mixtral_jax.models.transformer import ModelOutput, Transformer
from mixtral_jax.parallel.mesh import batch_sharding
from mixtral_jax.training.cost import DeviceClock
from mixtral_jax.training.errors import RunError
from mixtral_jax.training.hooks import EvalHook, LoopClock, LoopContext, loop_hooks, run_hooks
from mixtral_jax.training.nonfinite import SKIPPED, STREAK, NonfiniteGuard
from mixtral_jax.training.preemption import StopRequest
from mixtral_jax.training.trainer import Trainer, global_batch
from mixtral_jax.training.program import build_program

TOKENS_PER_STEP = 10
WAIT = 0.25  # data wait per step (a power of two: the window mean is exact)


class _Meter:
    tokens_per_step = TOKENS_PER_STEP

    def window(self, steps: int, elapsed_s: float, done: int) -> dict:
        return {"window_steps": steps}


class _Logger:
    def __init__(self):
        self.records = {}

    def log(self, step: int, record: dict) -> None:
        self.records[step] = dict(record)


class _Saver:
    def __init__(self):
        self.saved = []
        self.during_save = lambda step: None  # what happens while step's checkpoint is written

    def save(self, step: int, state: dict, data_state, meta: dict) -> None:
        assert state["step"] == step and data_state == {"position": step} and "clock_seconds" in meta
        self.saved.append(step)
        self.during_save(step)


class _Data:
    """The train iterator's checkpointed position: the loop's step."""

    def __init__(self, ctx: LoopContext):
        self.ctx = ctx

    def get_state(self) -> dict:
        return {"position": self.ctx.done}


class _Loop:
    """The trainer's loop around its hooks, with a fake step (step d's loss is d, its update
    skipped if d is in `bad`) and fakes for the logger, evaluation and the checkpointer."""

    def __init__(self, log_every, eval_every, checkpoint_every, start, last_step, policy="stop"):
        self.stop = StopRequest()  # not entered: no handlers; the test sets `requested` as a signal would
        self.ctx = LoopContext(done=start, last_step=last_step, state={"step": start}, stop=self.stop,
                               last_saved=start or None)
        self.clock = LoopClock(DeviceClock(1))
        guard = NonfiniteGuard(policy, 2)
        self.evals, self.logger, self.saver = [], _Logger(), _Saver()
        self.during_eval = lambda step: None  # what happens while step's evaluation runs
        self.hooks = loop_hooks(log_every, checkpoint_every, guard, _Meter(), self.clock,  # the trainer's hooks
                                EvalHook(eval_every, self.evaluate, self.clock), self.logger, self.saver,
                                _Data(self.ctx))

    def evaluate(self, state: dict) -> dict:
        self.evals.append(state["step"])
        self.during_eval(state["step"])
        return {"eval_loss": 1.0}

    def signal_at(self, step: int) -> "callable":
        """A callback that delivers SIGTERM when called for `step`."""
        def deliver(at: int) -> None:
            if at == step:
                self.stop.requested = "SIGTERM"
        return deliver

    def run(self, stop_after=None, bad=()) -> "_Loop":
        """stop_after: a signal arrives while step `stop_after` runs."""
        self.clock.start()
        for step in range(self.ctx.done, self.ctx.last_step):
            self.clock.waited(WAIT)
            done = step + 1
            if done == stop_after:
                self.stop.requested = "SIGTERM"
            self.ctx.finish_step({"step": done}, {"loss": np.float32(done), SKIPPED: np.int32(done in bad),
                                                  STREAK: np.int32(self._streak(done, bad))})
            run_hooks(self.hooks, self.ctx)
            if self.ctx.stopping:
                break
        return self

    @staticmethod
    def _streak(done, bad) -> int:
        streak = 0
        while done - streak in bad:
            streak += 1
        return streak

    @property
    def records(self) -> dict:
        return self.logger.records


@pytest.mark.parametrize("log_every,eval_every,checkpoint_every,start,last_step,stop_after", [
    (3, 4, 5, 0, 7, None),
    (1, 1, 1, 0, 3, None),
    (2, 3, 3, 0, 5, None),  # fit(stop_at=5) of a longer run: the last step is 5
    (2, 3, 3, 5, 7, None),  # its resume: the periods count the run's steps, not the attempt's
    (2, 4, 4, 0, 9, 3),  # a stop request during step 3: checkpoint there, log only on period
    (10, 10, 10, 0, 25, 20),  # a stop on a step that is due anyway: saved once
    (4, 6, 100, 2, 13, None),
])
def test_hooks_run_on_their_periods_the_last_step_and_a_stop(log_every, eval_every, checkpoint_every, start,
                                                             last_step, stop_after):
    loop = _Loop(log_every, eval_every, checkpoint_every, start, last_step).run(stop_after)
    end = stop_after or last_step
    expect_log, expect_eval, expect_save = [], [], []
    for done in range(start + 1, end + 1):
        if done % log_every == 0 or done == last_step:
            expect_log.append(done)
        if done % eval_every == 0 or done == last_step:
            expect_eval.append(done)
        if done % checkpoint_every == 0 or done == last_step or done == stop_after:
            expect_save.append(done)
    records = loop.records
    assert [s for s, r in records.items() if "loss" in r] == expect_log
    assert loop.evals == expect_eval and [s for s, r in records.items() if "eval_loss" in r] == expect_eval
    assert sorted(records) == sorted(set(expect_log) | set(expect_eval))  # nothing else is written
    assert loop.saver.saved == expect_save
    previous = start
    for done in expect_log:  # each log covers exactly the steps since the previous one
        window = list(range(previous + 1, done + 1))
        record = records[done]
        assert record["window_steps"] == len(window) and record["loss"] == pytest.approx(np.mean(window))
        assert record["tokens_seen"] == done * TOKENS_PER_STEP and record["data_wait_s"] == WAIT
        assert STREAK not in record and record[SKIPPED] == 0
        previous = done


def test_a_signal_during_eval_stops_at_that_step_with_a_save():
    loop = _Loop(log_every=2, eval_every=3, checkpoint_every=10, start=0, last_step=8)
    loop.during_eval = loop.signal_at(3)
    loop.run()
    assert loop.saver.saved == [3] and loop.ctx.done == 3


def test_a_signal_during_a_save_is_acted_on_at_the_next_step_with_a_save():
    """The checkpoint hook and the loop's exit act on one reading of the stop request: a signal
    landing while step 2's periodic checkpoint is written neither ends the loop without a save
    of its own step nor is lost; step 3 saves and the loop stops there."""
    loop = _Loop(log_every=2, eval_every=100, checkpoint_every=2, start=0, last_step=8)
    loop.saver.during_save = loop.signal_at(2)
    loop.run()
    assert loop.saver.saved == [2, 3] and loop.ctx.done == 3


def test_a_bad_step_not_logged_yet_stops_the_run_before_the_next_checkpoint():
    # Logged every 5 steps, checkpointed every 2: the bad step 3 is caught before step 4's save.
    loop = _Loop(5, 10, 2, 0, 6)
    with pytest.raises(RunError, match=r"at step 3 .*last checkpoint \(step 2\) is intact"):
        loop.run(bad={3})
    assert loop.saver.saved == [2] and loop.records == {}


def test_the_skip_policy_logs_isolated_bad_steps_and_stops_at_the_streak_before_writing_it():
    loop = _Loop(1, 100, 2, 0, 8, policy="skip").run(bad={2, 4})  # at most 1 in a row: tolerated
    assert sorted(loop.records) == list(range(1, 9)) and loop.saver.saved == [2, 4, 6, 8]
    assert [loop.records[s][SKIPPED] for s in range(1, 9)] == [0, 1, 0, 1, 0, 0, 0, 0]
    assert loop.records[2]["loss"] == 2.0  # a window of a skipped step alone keeps its loss
    loop = _Loop(1, 100, 2, 0, 8, policy="skip")
    with pytest.raises(RunError, match=r"at step 5 \(2 consecutive.*last checkpoint \(step 4\) is intact"):
        loop.run(bad={4, 5})
    assert sorted(loop.records) == [1, 2, 3, 4] and loop.saver.saved == [2, 4]


def test_eval_is_off_the_device_clock_and_the_window_time():
    clock = LoopClock(DeviceClock(1))
    clock.start()
    seen = []

    def evaluate(state):
        before = clock.device.running_seconds
        time.sleep(0.2)
        seen.append(clock.device.running_seconds - before)
        return {"eval_loss": 2.0}

    ctx = LoopContext(done=0, last_step=1, state={}, stop=StopRequest())
    ctx.finish_step({}, {})
    EvalHook(1, evaluate, clock).run(ctx)
    assert seen == [0.0] and ctx.record == {"eval_loss": 2.0}
    assert clock.window_seconds() < 0.2  # the window's step time leaves the eval out
    running = clock.device.running_seconds
    time.sleep(0.01)
    assert clock.device.running_seconds > running  # and the device clock runs again


# ---------------------------------------------------------------- the model seam

class _Variant(Transformer):
    """Transformer with every weight of the embedding 1, uniform logits and aux_loss 7: a
    program built from it shows each in its init and its steps."""

    calls: list = []

    def __init__(self, cfg, *, rngs):
        _Variant.calls.append((cfg, rngs))
        super().__init__(cfg, rngs=rngs)
        self.embed[...] = jnp.ones_like(self.embed[...])

    def __call__(self, tokens, **kwargs):
        logits, aux = super().__call__(tokens, **kwargs)
        return ModelOutput(jnp.zeros_like(logits), dict(aux, aux_loss=jnp.float32(7.0)))


TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.head_dim=8", "model.hidden_dim=48", "model.moe.num_experts=4", "data.seq_len=16",
        "data.batch_size=8", "optim.warmup_steps=0", "logging.progress=false", "logging.wandb=off"]


def _batch(cfg, mesh):
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(3, cfg.model.vocab_size, size=(b, t + 1)).astype(np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((b, t), np.int32),
             "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)), "loss_mask": np.ones((b, t), np.float32)}
    return global_batch(local, batch_sharding(mesh))


def _embed(state: dict) -> np.ndarray:
    [embed] = [x for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0] if path_name(p) == "embed"]
    return np.asarray(jax.device_get(embed))


def test_build_program_builds_init_and_steps_with_the_model_factory():
    cfg, mesh = load_config("quickstart", [*TINY, "model.vocab_size=128"]), mesh_of({"data": 1})
    _Variant.calls.clear()
    program = build_program(cfg, mesh, _Variant)
    assert _Variant.calls and all(c is cfg.model for c, _ in _Variant.calls)
    state = program.init_state()
    np.testing.assert_array_equal(_embed(state), 1.0)
    batch = _batch(cfg, mesh)
    loss_sum, count = program.eval_step(state["params"], state["model_state"], batch)
    assert float(loss_sum) / float(count) == pytest.approx(math.log(128), abs=1e-5)
    _, metrics = program.train_step(state, batch)
    assert float(metrics["lm_loss"]) == pytest.approx(math.log(128), abs=1e-5)
    assert float(metrics["aux_loss"]) == 7.0  # a Transformer's is a mean of router losses, never exactly 7


def test_trainer_passes_its_model_factory_to_the_program(tmp_path, corpus_cache):
    cfg = load_config("quickstart", [f"run.out_dir={tmp_path}", "run.name=variant", *TINY])
    _Variant.calls.clear()
    trainer = Trainer(cfg, model_factory=_Variant)
    try:
        assert _Variant.calls and all(c is cfg.model for c, _ in _Variant.calls)
        np.testing.assert_array_equal(_embed(trainer.init_state()), 1.0)
    finally:
        trainer.checkpointer.close()
        trainer.release()
