"""A config on a mesh, made into what training runs: the sharded fresh state, the jitted train
and eval steps and the state's layout. The one place this happens; the Trainer, `compile`, the
sharding and multi-process tests and the benchmarks all build their steps here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from mixtral_jax.config import Config, ModelConfig
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.parallel.mesh import batch_sharding, replicated, traced_under
from mixtral_jax.parallel.rules import state_shardings
from mixtral_jax.training import lora
from mixtral_jax.training.nonfinite import COUNTERS, init_counters
from mixtral_jax.training.optim import learning_rate_schedule, make_optimizer
from mixtral_jax.training.step import TrainState, make_eval_step, make_train_step, trainable_key


class ModelFactory(Protocol):
    """Builds the model a program trains: `Transformer`, or a variant of it (a benchmark's
    prototype) with the same parameters, called as `factory(cfg.model, rngs=nnx.Rngs(seed))`."""

    def __call__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module: ...


def make_init_fn(cfg: Config, tx: optax.GradientTransformation,
                 model_factory: ModelFactory = Transformer) -> Callable[[], TrainState]:
    """`init() -> fresh train state`; jit it with the rules' out_shardings to build it sharded."""

    def init() -> TrainState:
        model = model_factory(cfg.model, rngs=nnx.Rngs(cfg.run.seed))
        _, params, model_state = nnx.split(model, nnx.Param, ...)
        state = {"step": jnp.asarray(0, jnp.int32), "params": params, "model_state": model_state,
                 "rng": jax.random.PRNGKey(cfg.run.seed + 1), COUNTERS: init_counters()}
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


def build_program(cfg: Config, mesh: Mesh, model_factory: ModelFactory = Transformer) -> Program:
    """The one place a config and a mesh become a sharded init and jitted steps (the Trainer,
    the sharding / multi-process tests and the benchmarks all use it). `model_factory` builds
    the model both for the initial weights and for the steps' graph, so a variant passed here
    is the model trained, with no patching of this module."""
    tx = make_optimizer(cfg.optim, cfg.train.steps, cfg.finetune)
    init_fn = make_init_fn(cfg, tx, model_factory)
    abstract = jax.eval_shape(init_fn)
    shardings = state_shardings(abstract, mesh)
    graphdef = nnx.split(nnx.eval_shape(lambda: model_factory(cfg.model, rngs=nnx.Rngs(0))), nnx.Param, ...)[0]
    train_step, eval_step = sharded_steps(cfg, graphdef, tx, learning_rate_schedule(cfg.optim, cfg.train.steps),
                                          mesh, shardings)
    # Each device computes only its own shards: no full copy of the model on one device.
    init_state = jax.jit(init_fn, out_shardings=shardings)
    return Program(abstract, shardings, init_state, train_step, eval_step)
