"""The training loop: set up a run directory, data, model and optimizer, resume if the run
has checkpoints, then step / log / evaluate / checkpoint until `train.steps`."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mixtral_jax.config import Config, ConfigError, LoRAConfig, load_config, save_config
from mixtral_jax.data.pipeline import heldout_unigram_entropy, make_eval_batches, make_train_iterator
from mixtral_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer
from mixtral_jax.models.transformer import Transformer, param_counts
from mixtral_jax.parallel.mesh import batch_divisor, batch_sharding, make_mesh, replicated, traced_under
from mixtral_jax.parallel.rules import state_shardings
from mixtral_jax.training.checkpoint import TRAINER, Checkpointer
from mixtral_jax.training.meter import RunMeter
from mixtral_jax.training.metrics import MetricsLogger
from mixtral_jax.training.preemption import StopRequest
from mixtral_jax.training.optim import learning_rate_schedule, make_optimizer, param_group
from mixtral_jax.training import lora
from mixtral_jax.training.step import TrainState, make_eval_step, make_train_step, trainable_key


class Trainer:
    """One run: `Trainer(cfg).fit()` trains (or resumes) and returns the summary dict."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")
        self.mesh = make_mesh(cfg.mesh)
        if cfg.data.batch_size % (batch_divisor(self.mesh) * cfg.optim.grad_accum):
            raise ConfigError(
                f"config key 'data.batch_size': {cfg.data.batch_size} must be divisible by the data-parallel "
                f"devices ({batch_divisor(self.mesh)}) x optim.grad_accum ({cfg.optim.grad_accum})")
        self.tokenizer = self._tokenizer()
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
        program = self.program = build_program(cfg, self.mesh)
        self.abstract_state, self.state_shardings = program.abstract_state, program.state_shardings
        self.train_step, self.eval_step = program.train_step, program.eval_step
        self.init_state = program.init_state

    # ------------------------------------------------------------------ setup

    def _tokenizer(self) -> Tokenizer:
        tok = load_or_train_tokenizer(self.cfg.data, self.cfg.model.vocab_size)
        target = self.run_dir / "tokenizer.model"
        if Path(tok.path).resolve() != target.resolve():
            shutil.copyfile(tok.path, target)
        return tok

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
        except (ValueError, KeyError) as err:
            raise ConfigError(f"config key 'train.init_from': checkpoint {ckpt_dir}/{step} does not match this "
                              f"model config ({str(err).splitlines()[0][:200]})") from None
        other.close()
        return weights

    # ------------------------------------------------------------------ loop

    def fit(self, stop_at: int | None = None) -> dict:
        """Train to `train.steps` (or stop early after step `stop_at`, checkpointed, as a
        preempted job would); returns the summary."""
        cfg = self.cfg
        last_step = min(cfg.train.steps, stop_at) if stop_at is not None else cfg.train.steps
        state, data_iter, meta = self._restore_or_init()
        eval_batches = make_eval_batches(cfg.data, self.tokenizer, cfg.train.eval_batches,
                                         shard_index=jax.process_index(), shard_count=jax.process_count())
        start = int(state["step"])
        meter = RunMeter(cfg, meta.get("clock_seconds", 0.0))
        logger = MetricsLogger(self.run_dir, total_steps=cfg.train.steps, start_step=start,
                               wandb_mode=cfg.logging.wandb, wandb_project=cfg.logging.wandb_project,
                               run_name=cfg.run.name, config=asdict(cfg), progress=cfg.logging.progress)
        if start:
            logger.write(f"resumed {self.run_dir} at step {start}")
        to_device = batch_sharding(self.mesh)
        step_fn, compile_s = None, 0.0
        window: list[dict] = []
        eval_metrics: dict[str, float] = {}
        with StopRequest() as stop:
            try:
                for step in range(start, last_step):
                    batch = global_batch(next(data_iter), to_device)
                    if step_fn is None:  # compile ahead of time so the device clock never counts it
                        compile_start = time.perf_counter()
                        step_fn = self.train_step.lower(state, batch).compile()
                        compile_s = time.perf_counter() - compile_start
                        window_start = time.perf_counter()
                        meter.clock.start()
                    state, metrics = step_fn(state, batch)
                    window.append(metrics)
                    done = step + 1
                    logger.advance()
                    record: dict[str, Any] = {}
                    if done % cfg.train.log_every == 0 or done == last_step:
                        record = _mean_metrics(jax.device_get(window))  # waits for the steps to finish
                        record.update(tokens_seen=done * meter.tokens_per_step,
                                      **meter.window(len(window), time.perf_counter() - window_start, done))
                        window, window_start = [], time.perf_counter()
                    if done % cfg.train.eval_every == 0 or done == last_step:
                        jax.block_until_ready(state)
                        meter.clock.pause()  # eval time is not training time
                        paused = time.perf_counter()
                        eval_metrics = self.evaluate(state, eval_batches)
                        record.update(eval_metrics)
                        window_start += time.perf_counter() - paused
                        meter.clock.start()
                    if record:
                        logger.log(done, record)
                    if done % cfg.train.checkpoint_every == 0 or done == last_step or stop.requested:
                        self.checkpointer.save(done, state, data_iter.get_state(),
                                               {"clock_seconds": meter.clock.running_seconds})
                    if stop.requested:
                        logger.write(f"{stop.requested}: stopped after step {done}, checkpoint saved; "
                                     f"run the same command again to resume")
                        break
                meter.clock.pause()
                summary = self._summary(state, eval_metrics, meter, compile_s)
                summary["stopped_by"] = stop.requested
                logger.summary(summary)
            finally:
                self.checkpointer.close()
                logger.close()
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _restore_or_init(self) -> tuple[dict, Any, dict]:
        """Fresh (or init_from) state, or the latest checkpoint of this run dir."""
        cfg = self.cfg
        data_iter = make_train_iterator(cfg.data, self.tokenizer, seed=cfg.run.seed,
                                        shard_index=jax.process_index(), shard_count=jax.process_count())
        latest = self.checkpointer.latest_step()
        if latest is None:
            return self._fresh_state(), data_iter, {}
        if not (self.checkpointer.directory / str(latest) / TRAINER).is_dir():
            raise ConfigError(f"{self.run_dir} holds weights only (imported, no optimizer or data state) and "
                              f"cannot be resumed: fine-tune from it with train.init_from={self.run_dir} and a new "
                              "run.name")
        # Restore straight into this mesh's shardings (whatever mesh the checkpoint was saved on).
        target = self.program.sharded_shapes()
        state, data_state, meta = self.checkpointer.restore(latest, target)
        data_iter.set_state(data_state)
        _truncate_metrics(self.run_dir, latest)
        return state, data_iter, meta

    def evaluate(self, state: dict, eval_batches: list[dict]) -> dict[str, float]:
        if not eval_batches:
            return {}
        data = batch_sharding(self.mesh)
        totals = [self.eval_step(state["params"], state["model_state"], global_batch(b, data), state.get("adapters"))
                  for b in eval_batches]
        loss_sum, count = (float(sum(x)) for x in zip(*jax.device_get(totals)))
        loss = loss_sum / max(count, 1.0)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def _summary(self, state: dict, eval_metrics: dict, meter: RunMeter, compile_s: float) -> dict:
        # The baseline a model must beat to have learned more than token frequencies: the
        # unigram entropy of the whole held-out split (the eval batches alone bias it low).
        entropy = heldout_unigram_entropy(self.cfg.data, self.tokenizer)
        counts = param_counts(self.cfg.model)
        last = _last_record(self.run_dir)
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
            **meter.totals(steps),
        }


def make_init_fn(cfg: Config, tx: optax.GradientTransformation) -> Callable[[], TrainState]:
    """`init() -> fresh train state`; jit it with the rules' out_shardings to build it sharded."""

    def init() -> TrainState:
        model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.run.seed))
        _, params, model_state = nnx.split(model, nnx.Param, ...)
        state = {"step": jnp.asarray(0, jnp.int32), "params": params, "model_state": model_state,
                 "rng": jax.random.PRNGKey(cfg.run.seed + 1)}
        if cfg.finetune.lora.rank > 0:
            state["adapters"] = lora.init_adapters(params, cfg.finetune.lora, cfg.model.is_moe,
                                                   jax.random.PRNGKey(cfg.run.seed + 2))
        # Moments keep the params' Variables, hence their shardings.
        state["opt_state"] = tx.init(state[trainable_key(cfg)])
        return state

    return init


def sharded_steps(cfg: Config, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                  mesh: Mesh, shardings: Any) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and eval step. Pinning the state's shardings on
    both sides keeps every step's output laid out like its input, so donation reuses buffers
    and nothing is silently gathered; metrics come back replicated (readable on every host)."""
    data, rep = batch_sharding(mesh), replicated(mesh)
    step_fn = traced_under(mesh, make_train_step(cfg, graphdef, tx, lr_schedule))
    train_step = jax.jit(step_fn, donate_argnums=0, in_shardings=(shardings, data), out_shardings=(shardings, rep))
    eval_step = jax.jit(traced_under(mesh, make_eval_step(graphdef, cfg.finetune.lora)), out_shardings=rep)
    return train_step, eval_step


@dataclass(frozen=True)
class Program:
    """Everything compiled for one config on one mesh: the sharded state layout and steps."""

    abstract_state: Any
    state_shardings: Any
    init_state: Callable[[], TrainState]  # builds the fresh state already sharded
    train_step: Callable
    eval_step: Callable

    def sharded_shapes(self) -> Any:
        """The state as ShapeDtypeStructs carrying this mesh's shardings: a restore target, or
        the abstract argument to lower the train step with."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self.abstract_state, self.state_shardings)


def build_program(cfg: Config, mesh: Mesh) -> Program:
    """The one place a config and a mesh become a sharded init and jitted steps (the Trainer
    and the sharding / multi-process tests all use it)."""
    tx = make_optimizer(cfg.optim, cfg.train.steps, cfg.finetune)
    init_fn = make_init_fn(cfg, tx)
    abstract = jax.eval_shape(init_fn)
    shardings = state_shardings(abstract, mesh)
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
    train_step, eval_step = sharded_steps(cfg, graphdef, tx, learning_rate_schedule(cfg.optim, cfg.train.steps),
                                          mesh, shardings)
    # Each device computes only its own shards: no full copy of the model on one device.
    init_state = jax.jit(init_fn, out_shardings=shardings)
    return Program(abstract, shardings, init_state, train_step, eval_step)


def trainable_count(state: dict, cfg: Config) -> int:
    """Scalars the optimizer updates: adapters under LoRA, else the weights outside frozen groups."""
    if cfg.finetune.lora.rank > 0:
        return lora.count(state["adapters"])
    leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return sum(int(leaf.size) for path, leaf in leaves
               if param_group(lora.path_name(path), cfg.finetune.freeze) != "frozen")


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


def _mean_metrics(window: list[dict]) -> dict[str, Any]:
    keys = window[-1].keys()
    return {k: np.mean(np.stack([np.asarray(m[k]) for m in window]), axis=0) for k in keys}


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop records an interrupted run logged after its last checkpoint (they are redone)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def _last_record(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train_records = [r for r in records if "loss" in r]
    return train_records[-1] if train_records else {}


def train(config_path: str | None, overrides: list[str] | None = None) -> dict:
    return Trainer(load_config(config_path, overrides)).fit()
