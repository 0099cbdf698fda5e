"""Orbax checkpoints of the whole training state: params, optimizer state, non-trainable
model state (e.g. router biases), step, data-iterator position, RNG and cost clock.

Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-write never replaces the last good checkpoint; saves are asynchronous so the
train loop keeps running while the previous step is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mixtral_jax.config import LoRAConfig
from mixtral_jax.training import lora

WEIGHTS = "weights"  # {params, model_state (, adapters)}: what fine-tuning and export need
TRAINER = "trainer"  # {step, opt_state, rng}: what only resuming needs


class Checkpointer:
    """Save / restore `{weights, trainer: pytrees; data, meta: json}` under one directory."""

    def __init__(self, directory: Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(WEIGHTS, TRAINER, "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: Any, meta: dict) -> None:
        """Start an asynchronous save of the train state (split into weights and trainer parts)."""
        weights, trainer = split_state(state)
        args = ocp.args.Composite(**{
            WEIGHTS: ocp.args.StandardSave(weights),
            TRAINER: ocp.args.StandardSave(trainer),
            "data": ocp.args.JsonSave(data_state),
            "meta": ocp.args.JsonSave(meta),
        })
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, Any, dict]:
        """Restore everything into the shapes, dtypes and shardings of `abstract_state`."""
        weights, trainer = split_state(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            WEIGHTS: ocp.args.StandardRestore(_target(weights)),
            TRAINER: ocp.args.StandardRestore(_target(trainer)),
            "data": ocp.args.JsonRestore(),
            "meta": ocp.args.JsonRestore(),
        }))
        return {**restored[WEIGHTS], **restored[TRAINER]}, restored["data"], restored["meta"]

    def restore_weights(self, step: int, abstract_weights: dict) -> dict:
        """Only {params, model_state}, e.g. to fine-tune from another run with a fresh optimizer."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{WEIGHTS: ocp.args.StandardRestore(_target(abstract_weights))}))
        return restored[WEIGHTS]

    def restore_merged(self, step: int, abstract_weights: dict, lora_cfg: LoRAConfig, is_moe: bool) -> dict:
        """{params, model_state} of a checkpoint, LoRA adapters (if the run trained some) merged
        into the params: what eval, generation, export and `train.init_from` consume."""
        if lora_cfg.rank == 0:
            return self.restore_weights(step, abstract_weights)
        adapters = lora.abstract_adapters(abstract_weights["params"], lora_cfg, is_moe)
        weights = self.restore_weights(step, {**abstract_weights, "adapters": adapters})
        return {"params": lora.merge(weights["params"], weights["adapters"], lora_cfg),
                "model_state": weights["model_state"]}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def split_state(state: dict) -> tuple[dict, dict]:
    weights = {k: state[k] for k in ("params", "model_state", "adapters") if k in state}
    trainer = {k: v for k, v in state.items() if k not in weights}
    return weights, trainer


def _target(tree: Any) -> Any:
    """Restore targets. Leaves that carry a sharding (the trainer passes the current mesh's)
    are restored into it, resharding whatever mesh wrote the checkpoint; leaves without one
    (eval / generate build abstract models) go to the first local device rather than to the
    saved layout, whose devices may not exist in this process."""

    def one(leaf: Any) -> Any:
        struct = ocp.utils.to_shape_dtype_struct(leaf)
        if getattr(struct, "sharding", None) is None:
            struct = jax.ShapeDtypeStruct(struct.shape, struct.dtype,
                                          sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
        return struct

    return jax.tree.map(one, tree)
