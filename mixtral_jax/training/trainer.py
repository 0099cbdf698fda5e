"""The training loop: set up a run directory, data, model and optimizer, resume if the run
has checkpoints, then step until `train.steps`, logging, evaluating and checkpointing each on
its own period (hooks.py). program.py turns a config and a mesh into the sharded init and the
compiled steps.

Fault tolerance (each piece in its own module): the run dir is locked and probed before
anything is written or compiled (run_lock.py); checkpoints left by a crash are checked and a
damaged one is set aside (recovery.py); a non-finite step changes nothing and the run stops by
policy (nonfinite.py); SIGINT / SIGTERM checkpoint at the next step boundary (preemption.py); a
failed checkpoint write stops the run with the last complete checkpoint intact (checkpoint.py)."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from mixtral_jax.config import Config, ConfigError, LoRAConfig, load_config, save_config
from mixtral_jax.data.hosts import gather_states, local_state
from mixtral_jax.data.mixture import mixture_weights
from mixtral_jax.data.pipeline import heldout_unigram_entropy, make_eval_sets, make_train_iterator
from mixtral_jax.data.tokenizer import load_or_train_tokenizer
from mixtral_jax.models.params import param_counts, path_name
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.parallel.mesh import batch_divisor, batch_sharding, make_mesh
from mixtral_jax.training.checkpoint import TRAINER, Checkpointer, complete_steps
from mixtral_jax.training.errors import RunError
from mixtral_jax.training.hooks import DownstreamHook, EvalHook, LoopClock, LoopContext, loop_hooks, run_hooks
from mixtral_jax.training.meter import RunMeter
from mixtral_jax.training.metrics import MetricsLogger, last_train_record, truncate_metrics
from mixtral_jax.training.nonfinite import COUNTERS, NonfiniteGuard
from mixtral_jax.training.preemption import StopRequest
from mixtral_jax.training.program import ModelFactory, build_program
from mixtral_jax.training.preflight import check_token_ids, check_vocab
from mixtral_jax.training.recovery import remove_incomplete, restore_latest_good, verify_latest_shapes
from mixtral_jax.training.run_lock import PROBE_NAME, claim_run_dir
from mixtral_jax.training.optim import param_group
from mixtral_jax.training import lora


class Trainer:
    """One run: `Trainer(cfg).fit()` trains (or resumes) and returns the summary dict.
    `model_factory` builds the model (see build_program)."""

    def __init__(self, cfg: Config, model_factory: ModelFactory = Transformer):
        self.cfg = cfg
        self.model_factory = model_factory
        self.run_dir = cfg.run_dir
        self.primary = jax.process_index() == 0  # the processes of one job share the run dir
        self.notes: list[str] = []  # warnings found during setup, printed when training starts
        # Claim the run dir before writing or compiling anything: a second trainer on it is
        # refused here, an unwritable or full disk fails now rather than at the first checkpoint.
        self.lock = claim_run_dir(self.run_dir, primary=self.primary,
                                  probe_name=f"{PROBE_NAME}.{jax.process_index()}")
        if self.lock.note:
            self.notes.append(self.lock.note)
        try:
            self._setup()
        except BaseException:
            if hasattr(self, "checkpointer"):
                self.checkpointer.close(raise_errors=False)
            self.lock.release()
            raise

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg = self.cfg
        self.mesh = make_mesh(cfg.mesh)
        if cfg.data.batch_size % (batch_divisor(self.mesh) * cfg.optim.grad_accum):
            raise ConfigError(
                f"config key 'data.batch_size': {cfg.data.batch_size} must be divisible by the data-parallel "
                f"devices ({batch_divisor(self.mesh)}) x optim.grad_accum ({cfg.optim.grad_accum})")
        self.tokenizer = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)
        check_vocab(self.tokenizer.vocab_size, cfg.model.vocab_size, self.tokenizer.path)
        ckpt_dir = self.run_dir / "checkpoints"
        if self.primary:  # before orbax lists the steps: a crash mid-save leaves a temporary dir
            self.notes += remove_incomplete(ckpt_dir)
        self.checkpointer = Checkpointer(ckpt_dir, keep=cfg.train.keep_checkpoints)
        program = self.program = build_program(cfg, self.mesh, self.model_factory)
        self.abstract_state, self.state_shardings = program.abstract_state, program.state_shardings
        self.train_step, self.eval_step = program.train_step, program.eval_step
        self.init_state = program.init_state
        # Checkpoints from another model config fail here, before this config replaces the run's.
        verify_latest_shapes(self.checkpointer, program.sharded_shapes())
        save_config(cfg, self.run_dir / "config.yaml")
        target = self.run_dir / "tokenizer.model"
        if Path(self.tokenizer.path).resolve() != target.resolve():
            shutil.copyfile(self.tokenizer.path, target)
        self.task_suite = None
        if cfg.train.eval_tasks:  # a misspelled task fails now, not at the first evaluation
            from mixtral_jax.downstream.harness import TaskSuite

            self.task_suite = TaskSuite.resolve(cfg.train.eval_tasks, cfg.train.eval_tasks_include_path)

    def release(self) -> None:
        """Give the run dir up (fit does it when it ends, however it ends)."""
        self.lock.release()

    def _fresh_state(self) -> dict:
        # Each device computes only its own shards: no full copy of the model on one device.
        state = self.init_state()
        if self.cfg.train.init_from:
            state.update(self._load_init_weights(state))
        return state

    def _load_init_weights(self, state: dict) -> dict:
        source = Path(self.cfg.train.init_from)
        ckpt_dir = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        other = Checkpointer(ckpt_dir, keep=1000)
        step = other.latest_step()
        if step is None:
            raise ConfigError(f"config key 'train.init_from': no checkpoint found under {ckpt_dir}")
        abstract = {k: state[k] for k in ("params", "model_state")}
        # A LoRA run's checkpoint holds base weights + adapters: start from their merge.
        source_cfg = load_config(source / "config.yaml") if (source / "config.yaml").is_file() else None
        lora_cfg = source_cfg.finetune.lora if source_cfg else LoRAConfig()
        try:
            weights = other.restore_merged(step, abstract, lora_cfg, self.cfg.model.is_moe)
        except RunError as err:  # damaged: its own line names the step, arrays and files in full
            raise RunError(f"train.init_from: {err}") from err
        except (ValueError, KeyError) as err:
            raise ConfigError(f"config key 'train.init_from': checkpoint {ckpt_dir}/{step} does not match this "
                              f"model config ({str(err).splitlines()[0][:200]})") from None
        finally:
            other.close(raise_errors=False)
        return weights

    # ------------------------------------------------------------------ loop

    def fit(self, stop_at: int | None = None) -> dict:
        """Train to `train.steps` (or stop early after step `stop_at`, checkpointed, as a
        preempted job would); returns the summary. Releases the run dir however it ends."""
        try:
            # Installed first: a signal during restore or compile stops after the first step.
            with StopRequest() as stop:
                return self._fit(stop, stop_at)
        finally:
            self.release()

    def _fit(self, stop: StopRequest, stop_at: int | None) -> dict:
        cfg = self.cfg
        last_step = min(cfg.train.steps, stop_at) if stop_at is not None else cfg.train.steps
        try:
            state, data_iter, meta = self._restore_or_init()
        except BaseException:
            self.checkpointer.close(raise_errors=False)
            raise
        self.notes += getattr(data_iter, "notes", [])  # a data mixture's normalised or changed weights
        eval_batches = make_eval_sets(cfg.data, self.tokenizer, cfg.train.eval_batches,
                                      shard_index=jax.process_index(), shard_count=jax.process_count())
        start = int(state["step"])
        meter = RunMeter(cfg, meta.get("clock_seconds", 0.0))
        logger = MetricsLogger(self.run_dir, total_steps=cfg.train.steps, start_step=start,
                               wandb_mode=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                               run_name=cfg.run.name, config=asdict(cfg), progress=cfg.logging.progress,
                               primary=self.primary)
        for note in self.notes:
            logger.write(note)
        if start:
            logger.write(f"resumed {self.run_dir} at step {start}")
        to_device = batch_sharding(self.mesh)
        ctx = LoopContext(done=start, last_step=last_step, state=state, stop=stop, last_saved=start or None)
        clock = LoopClock(meter.clock)
        guard = NonfiniteGuard(cfg.train.on_nonfinite, cfg.train.max_consecutive_nonfinite)
        evaluator = EvalHook(cfg.train.eval_every, lambda s: self.evaluate(s, eval_batches), clock)
        downstream = DownstreamHook(cfg.train.eval_tasks_every, self.evaluate_tasks, clock) if self.task_suite else None
        hooks = loop_hooks(cfg.train.log_every, cfg.train.checkpoint_every, guard, meter, clock, evaluator, logger,
                           self.checkpointer, _AllHostsData(data_iter), downstream,
                           data_metrics=(lambda: source_token_metrics(data_iter)) if cfg.data.mixture else None)
        step_fn, compile_s = None, 0.0
        try:
            for _ in range(start, last_step):
                fetch_start = time.perf_counter()
                local = next(data_iter)
                if step_fn is None:  # compile ahead of time so the device clock never counts it
                    step_fn, batch, compile_s = self._compile(ctx.state, local, to_device)
                    clock.start()
                else:
                    batch = global_batch(local, to_device)
                    clock.waited(time.perf_counter() - fetch_start)
                ctx.finish_step(*step_fn(ctx.state, batch))
                logger.advance()
                run_hooks(hooks, ctx)
                if ctx.stopping:
                    logger.write(f"{ctx.stopping}: stopped after step {ctx.done}, checkpoint saved; "
                                 f"run the same command again to resume")
                    break
            meter.clock.pause()
            summary = self._summary(ctx.state, evaluator.metrics, meter, compile_s)
            summary.update(downstream.metrics if downstream else {})
            summary["stopped_by"] = stop.requested
            logger.summary(summary)
        except BaseException:
            self.checkpointer.close(raise_errors=False)  # earlier saves finish; the error stays the one raised
            raise
        else:
            self.checkpointer.close()  # a failed final background save is an error of this run
        finally:
            logger.close()
        if self.primary:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _compile(self, state: dict, local: dict, to_device: NamedSharding) -> tuple[Callable, dict, float]:
        """The train step compiled for the first batch (checked against the vocabulary first),
        that batch on the devices, and the compile's seconds."""
        check_token_ids(local, self.cfg.model.vocab_size)
        batch = global_batch(local, to_device)
        compile_start = time.perf_counter()
        step_fn = self.train_step.lower(state, batch).compile()
        return step_fn, batch, time.perf_counter() - compile_start

    def _restore_or_init(self) -> tuple[dict, Any, dict]:
        """Fresh (or init_from) state, or the newest good checkpoint of this run dir."""
        cfg = self.cfg
        data_iter = make_train_iterator(cfg.data, self.tokenizer, seed=cfg.run.seed,
                                        shard_index=jax.process_index(), shard_count=jax.process_count())
        steps = complete_steps(self.checkpointer.directory)
        if steps == [0] and not (self.checkpointer.directory / "0" / TRAINER).is_dir():
            raise ConfigError(f"{self.run_dir} holds weights only (imported, no optimizer or data state) and "
                              f"cannot be resumed: fine-tune from it with train.init_from={self.run_dir} and a new "
                              "run.name")
        # Restore straight into this mesh's shardings (whatever mesh the checkpoint was saved on).
        found = restore_latest_good(self.checkpointer, self.program.sharded_shapes(), move_aside=self.primary)
        if found is None:
            if self.primary:  # the one process that writes metrics.jsonl
                truncate_metrics(self.run_dir, 0)  # records of an attempt that died before its first checkpoint
            return self._fresh_state(), data_iter, {}
        step, state, data_state, meta, notes = found
        self.notes += notes
        data_iter.set_state(local_state(data_state))
        if self.primary:
            truncate_metrics(self.run_dir, step)
        return state, data_iter, meta

    def evaluate(self, state: dict, eval_sets: dict[str, list[dict]]) -> dict[str, float]:
        """Held-out loss of each set (make_eval_sets). A mixture logs eval_loss/<name> per source, and
        as eval_loss their mean weighted by the mixture's weights (the loss on the training mix)."""
        losses = {name: self._eval_loss(state, batches) for name, batches in eval_sets.items() if batches}
        if not losses:
            return {}
        if list(losses) == [""]:
            loss, per_source = losses[""], {}
        else:
            weights = dict(zip((m.name for m in self.cfg.data.mixture), mixture_weights(self.cfg.data.mixture)))
            loss = sum(weights[n] * v for n, v in losses.items()) / sum(weights[n] for n in losses)
            per_source = {f"eval_loss/{name}": value for name, value in losses.items()}
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), **per_source}

    def _eval_loss(self, state: dict, eval_batches: list[dict]) -> float:
        data = batch_sharding(self.mesh)
        totals = [self.eval_step(state["params"], state["model_state"], global_batch(b, data), state.get("adapters"))
                  for b in eval_batches]
        loss_sum, count = (float(sum(x)) for x in zip(*jax.device_get(totals)))
        return loss_sum / max(count, 1.0)

    def evaluate_tasks(self, state: dict) -> dict[str, float]:
        """train.eval_tasks on the state's weights (LoRA adapters merged) through lm-eval:
        `downstream/<task>/<metric>` figures (no bootstrap stderr: the figures are logged as is)."""
        from mixtral_jax.downstream.adapter import MixtralLM
        from mixtral_jax.downstream.harness import downstream_metrics

        t = self.cfg.train
        graphdef = nnx.split(nnx.eval_shape(lambda: self.model_factory(self.cfg.model, rngs=nnx.Rngs(0))),
                             nnx.Param, ...)[0]
        params = lora.merge(state["params"], state.get("adapters"), self.cfg.finetune.lora)
        model = nnx.merge(graphdef, params, state["model_state"])
        lm = MixtralLM(model, self.tokenizer, model_cfg=self.cfg.model, mesh=self.mesh)
        results = self.task_suite.evaluate(lm, num_fewshot=t.eval_tasks_num_fewshot, limit=t.eval_tasks_limit,
                                           bootstrap_iters=0)
        return downstream_metrics(results)

    def _summary(self, state: dict, eval_metrics: dict, meter: RunMeter, compile_s: float) -> dict:
        # The baseline a model must beat to have learned more than token frequencies: the
        # unigram entropy of the whole held-out split (the eval batches alone bias it low).
        entropy = heldout_unigram_entropy(self.cfg.data, self.tokenizer)
        counts = param_counts(self.cfg.model)
        last = last_train_record(self.run_dir)
        steps = int(state["step"])
        return {
            "run": self.cfg.run.name,
            "steps": steps,
            "final_loss": last.get("loss"),
            "eval_loss": eval_metrics.get("eval_loss"),
            "eval_ppl": eval_metrics.get("eval_ppl"),
            "unigram_entropy": entropy,
            "params_total": counts["total"],
            "params_active": counts["active"],
            "params_trainable": trainable_count(state, self.cfg),
            "compile_s": compile_s,
            "nonfinite_skipped": int(state[COUNTERS]["total"]),  # steps whose update was dropped, whole run
            **meter.totals(steps),
        }


def trainable_count(state: dict, cfg: Config) -> int:
    """Scalars the optimizer updates: adapters under LoRA, else the weights outside frozen groups."""
    if cfg.finetune.lora.rank > 0:
        return lora.count(state["adapters"])
    leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return sum(int(leaf.size) for path, leaf in leaves
               if param_group(path_name(path), cfg.finetune.freeze) != "frozen")


class _AllHostsData:
    """What the checkpoint hook saves of the data: every process's iterator state (the primary
    process writes the checkpoint's JSON; each process resumes from its own part)."""

    def __init__(self, data_iter: Any):
        self.data_iter = data_iter

    def get_state(self) -> Any:
        return gather_states(self.data_iter.get_state())


def source_token_metrics(data_iter: Any) -> dict[str, int]:
    """`data/tokens/<name>`: each mixture source's tokens in the batches trained on so far, summed
    over the processes (each counts its own rows; every process logs at the same steps)."""
    names = list(data_iter.source_tokens)
    counts = np.asarray([data_iter.source_tokens[n] for n in names], np.int64)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, len(names)).sum(0)
    return {f"data/tokens/{name}": int(count) for name, count in zip(names, counts)}


def global_batch(local: dict, sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global batch arrays from this process's rows (the pipeline's shard `process_index` of
    `process_count`): each process contributes only its own slice, which must be the rows its
    devices hold under `sharding` (true for meshes built from jax.devices(), process-major)."""
    out = {}
    for key, value in local.items():
        value = np.asarray(value)
        shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, shape)
    return out


def train(config_path: str | None, overrides: list[str] | None = None) -> dict:
    return Trainer(load_config(config_path, overrides)).fit()
