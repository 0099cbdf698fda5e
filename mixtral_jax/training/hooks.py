"""The training loop's periodic work, one small hook per concern: logging, eval and
checkpointing, each with its own period, plus the clock they share.

After every step the loop runs its hooks in order (`run_hooks`); each decides from the shared
`LoopContext` whether it is due and then does its work. The order is part of the behaviour:
the log hook builds the step's metrics record, the eval hook (and, with train.eval_tasks, the
downstream-task hook) add to it, the record hook writes it, the stop hook reads the stop
request, and only then does the checkpoint hook save, so a record is on disk before the
checkpoint that covers its step.

The non-finite guard (nonfinite.py) is not a hook of its own: it is applied wherever metrics
come to the host (the log hook) and before every save (the checkpoint hook), because the loop
never syncs with the device per step just to look at them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import jax

from mixtral_jax.training.cost import DeviceClock
from mixtral_jax.training.meter import RunMeter
from mixtral_jax.training.metrics import MetricsLogger, window_record
from mixtral_jax.training.nonfinite import SKIPPED, STREAK, NonfiniteGuard


class StopFlag(Protocol):
    """What the loop reads of a stop request (preemption.StopRequest): the signal's name, or None."""

    requested: str | None


class Saver(Protocol):
    """The part of checkpoint.Checkpointer the checkpoint hook uses."""

    def save(self, step: int, state: dict, data_state: Any, meta: dict) -> None: ...


class DataState(Protocol):
    """The train iterator's position, checkpointed with the state so a resume replays no batch."""

    def get_state(self) -> Any: ...


@dataclass
class LoopContext:
    """What the loop and its hooks share. The loop sets `state` and grows `window` after each
    step; hooks read them and fill `record` (the step's metrics.jsonl record, empty when the
    step logs nothing), empty `window` once logged, and move `last_saved`."""

    done: int  # steps completed (the step counter after the step that just ran)
    last_step: int  # the loop ends after this step (train.steps, or fit's stop_at)
    state: Any
    stop: StopFlag
    last_saved: int | None = None  # the newest checkpoint's step, named when the guard stops the run
    window: list[dict] = field(default_factory=list)  # per-step metrics not logged yet (device arrays)
    record: dict[str, Any] = field(default_factory=dict)
    # The stop request as StopHook read it for this step: the checkpoint hook and the loop's exit
    # act on the same reading, so a signal arriving after it waits for the next step boundary.
    stopping: str | None = None

    def finish_step(self, state: Any, metrics: dict) -> None:
        """Take the step's outputs: the new state, its metrics queued for the next log."""
        self.state = state
        self.window.append(metrics)
        self.done += 1
        self.record = {}
        self.stopping = None

    @property
    def at_end(self) -> bool:
        return self.done == self.last_step


def periodic(every: int, ctx: LoopContext) -> bool:
    """Every `every` steps of the run's step count (so a resumed run keeps the same steps) and
    at the loop's last step."""
    return ctx.done % every == 0 or ctx.at_end


class LoopClock:
    """The log window's wall time and data wait, and the device clock (cost.py) they pause with.

    Started after the first step's compile, so neither counts it; paused around eval."""

    def __init__(self, device: DeviceClock):
        self.device = device
        self.window_start = 0.0
        self.data_wait = 0.0  # host seconds spent getting batches in this log window
        self._paused_at = 0.0

    def start(self) -> None:
        self.window_start = time.perf_counter()
        self.device.start()

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def window_seconds(self) -> float:
        return time.perf_counter() - self.window_start

    def new_window(self) -> None:
        self.window_start, self.data_wait = time.perf_counter(), 0.0

    def pause(self) -> None:
        self.device.pause()
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        """Go on as if the pause never happened: the window's step time excludes it too."""
        self.window_start += time.perf_counter() - self._paused_at
        self.device.start()


class Hook:
    """Work the loop does after a step, when `due`."""

    def due(self, ctx: LoopContext) -> bool:
        raise NotImplementedError

    def run(self, ctx: LoopContext) -> None:
        raise NotImplementedError


def run_hooks(hooks: Sequence[Hook], ctx: LoopContext) -> None:
    """Each hook in order; a hook's `due` sees what the hooks before it did."""
    for hook in hooks:
        if hook.due(ctx):
            hook.run(ctx)


class LogHook(Hook):
    """Every `every` steps and at the last: the window's metrics come to the host (the one
    sync with the device), the guard checks them, and they become the step's record, with
    throughput and cost from the meter, and `data_metrics()` (a data mixture's token counters)."""

    def __init__(self, every: int, guard: NonfiniteGuard, meter: RunMeter, clock: LoopClock,
                 data_metrics: Callable[[], dict[str, Any]] | None = None):
        self.every, self.guard, self.meter, self.clock = every, guard, meter, clock
        self.data_metrics = data_metrics

    def due(self, ctx: LoopContext) -> bool:
        return periodic(self.every, ctx)

    def run(self, ctx: LoopContext) -> None:
        host = jax.device_get(ctx.window)  # waits for the steps to finish
        self.guard.check([m[STREAK] for m in host], ctx.done - len(host) + 1, ctx.last_saved)
        steps = len(host)
        ctx.record = window_record(host, SKIPPED, internal=(STREAK,))
        # Batches are fetched while the previous step runs (dispatch is asynchronous),
        # so this is an upper bound on how long training waited for data.
        ctx.record.update(tokens_seen=ctx.done * self.meter.tokens_per_step,
                          data_wait_s=self.clock.data_wait / steps,
                          **self.meter.window(steps, self.clock.window_seconds(), ctx.done))
        if self.data_metrics is not None:
            ctx.record.update(self.data_metrics())
        ctx.window = []
        self.clock.new_window()


class EvalHook(Hook):
    """Every `every` steps and at the last: held-out loss added to the step's record. The
    latest result stays in `metrics` for the run's summary."""

    def __init__(self, every: int, evaluate: Callable[[Any], dict[str, float]], clock: LoopClock):
        self.every, self.evaluate, self.clock = every, evaluate, clock
        self.metrics: dict[str, float] = {}

    def due(self, ctx: LoopContext) -> bool:
        return periodic(self.every, ctx)

    def run(self, ctx: LoopContext) -> None:
        jax.block_until_ready(ctx.state)  # the steps' time is the window's, not eval's
        self.clock.pause()  # eval time is not training time
        self.metrics = self.evaluate(ctx.state)
        ctx.record.update(self.metrics)
        self.clock.resume()


class DownstreamHook(Hook):
    """Downstream tasks (lm-eval-harness) on the current weights: every `every` steps, or only at
    the loop's last step when `every` is 0. `evaluate(state)` returns `downstream/<task>/<metric>`
    figures, added to the step's record; the latest stay in `metrics` for the run's summary. Like
    EvalHook, the run's clocks are paused meanwhile: task time is not training time."""

    def __init__(self, every: int, evaluate: Callable[[Any], dict[str, float]], clock: LoopClock):
        self.every, self.evaluate, self.clock = every, evaluate, clock
        self.metrics: dict[str, float] = {}

    def due(self, ctx: LoopContext) -> bool:
        return ctx.at_end or (self.every > 0 and ctx.done % self.every == 0)

    def run(self, ctx: LoopContext) -> None:
        jax.block_until_ready(ctx.state)  # the steps' time is the window's, not the tasks'
        self.clock.pause()
        try:
            self.metrics = self.evaluate(ctx.state)
        finally:
            self.clock.resume()
        ctx.record.update(self.metrics)


class RecordHook(Hook):
    """Writes the step's record when the hooks before it made one."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def due(self, ctx: LoopContext) -> bool:
        return bool(ctx.record)

    def run(self, ctx: LoopContext) -> None:
        self.logger.log(ctx.done, ctx.record)


class StopHook(Hook):
    """Reads the stop request once per step, after logging and eval (a signal during a long eval
    still stops at this step) and before the checkpoint hook, which saves when one is read."""

    def due(self, ctx: LoopContext) -> bool:
        return True

    def run(self, ctx: LoopContext) -> None:
        ctx.stopping = ctx.stop.requested


class CheckpointHook(Hook):
    """Every `every` steps, at the last, and as soon as a stop is requested (the job is being
    preempted: its progress must survive): saves the state, the data position and the device
    clock's total."""

    def __init__(self, every: int, guard: NonfiniteGuard, checkpointer: Saver, data: DataState, clock: DeviceClock):
        self.every, self.guard, self.checkpointer, self.data, self.clock = every, guard, checkpointer, data, clock

    def due(self, ctx: LoopContext) -> bool:
        return periodic(self.every, ctx) or bool(ctx.stopping)

    def run(self, ctx: LoopContext) -> None:
        # Never checkpoint a state the non-finite policy stops on (steps not logged yet).
        streaks = jax.device_get([m[STREAK] for m in ctx.window])
        self.guard.check(streaks, ctx.done - len(ctx.window) + 1, ctx.last_saved)
        self.checkpointer.save(ctx.done, ctx.state, self.data.get_state(), {"clock_seconds": self.clock.running_seconds})
        ctx.last_saved = ctx.done


def loop_hooks(log_every: int, checkpoint_every: int, guard: NonfiniteGuard, meter: RunMeter, clock: LoopClock,
               evaluator: EvalHook, logger: MetricsLogger, checkpointer: Saver, data: DataState,
               downstream: DownstreamHook | None = None,
               data_metrics: Callable[[], dict[str, Any]] | None = None) -> list[Hook]:
    """The loop's hooks, in the order their work depends on (see the module docstring);
    `downstream` (train.eval_tasks) runs after the held-out eval, before the record is written."""
    return [LogHook(log_every, guard, meter, clock, data_metrics), evaluator, *([downstream] if downstream else []),
            RecordHook(logger), StopHook(), CheckpointHook(checkpoint_every, guard, checkpointer, data, clock.device)]
