"""Orbax checkpoints of the whole training state: params, optimizer state, non-trainable
model state (e.g. router biases), step, data-iterator position, RNG and cost clock.

Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-write never replaces the last good checkpoint; saves are asynchronous so the
train loop keeps running while the previous step is written. A write that fails (a full disk)
raises RunError naming the step and the last complete checkpoint, which the failure cannot
have touched; recovery.py checks checkpoints when a run starts.

Every save also writes digests of each array and JSON item (digests.py), committed with the
step; every restore compares the restored content against them and raises DigestMismatch naming
the step, the arrays and the files, so no damaged value ever reaches training, eval or export.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mixtral_jax.config import LoRAConfig
from mixtral_jax.training import digests, lora
from mixtral_jax.training.errors import RunError

WEIGHTS = "weights"  # {params, model_state (, adapters)}: what fine-tuning and export need
TRAINER = "trainer"  # {step, opt_state, rng, nonfinite counters}: what only resuming needs


class Checkpointer:
    """Save / restore `{weights, trainer: pytrees; data, meta: json}` under one directory.
    verify=False writes no digests and checks none (only to measure what they cost)."""

    def __init__(self, directory: Path, *, keep: int = 3, async_save: bool = True, verify: bool = True):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(WEIGHTS, TRAINER, "data", "meta", digests.ITEM))
        self.verify = verify
        self.notes: list[str] = []  # one line per restored step that has no digests to check
        self._pending: int | None = None  # the step whose background write may still be running

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: Any, meta: dict) -> None:
        """Start an asynchronous save of the train state (split into weights and trainer parts).
        Raises RunError if this save or the previous (background) one failed."""
        self._finish(self._pending)  # orbax waits for the previous save anyway; this names its step
        weights, trainer = split_state(state)
        args = ocp.args.Composite(**{
            WEIGHTS: ocp.args.StandardSave(weights),
            TRAINER: ocp.args.StandardSave(trainer),
            "data": ocp.args.JsonSave(data_state),
            "meta": ocp.args.JsonSave(meta),
            **self.digest_args({WEIGHTS: weights, TRAINER: trainer}, {"data": data_state, "meta": meta}),
        })
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as err:
            raise self._save_error(step, err) from err
        self._pending = step

    def digest_args(self, arrays: dict[str, Any], objects: dict[str, Any]) -> dict[str, Any]:
        """The digests item of a Composite save covering these items (none with verify=False)."""
        return {digests.ITEM: digests.DigestSave(arrays, objects)} if self.verify else {}

    def _finish(self, step: int | None) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._save_error(step, err) from err
        self._pending = None

    def _save_error(self, step: int | None, err: Exception) -> RunError:
        complete = complete_steps(self.directory)
        kept = (f"the last complete checkpoint, step {complete[-1]}, is intact (orbax moves a step into place "
                "only once it is fully written)" if complete else "no complete checkpoint exists yet")
        return RunError(f"could not save checkpoint step {step} in {self.directory} ({_describe(err)}); training "
                        f"stopped and {kept}. Free disk space (or fix the directory) and run the same command "
                        "again to resume")

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, Any, dict]:
        """Restore everything into the shapes, dtypes and shardings of `abstract_state`."""
        weights, trainer = split_state(abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            WEIGHTS: ocp.args.StandardRestore(_target(weights)),
            TRAINER: ocp.args.StandardRestore(_target(trainer)),
            "data": ocp.args.JsonRestore(),
            "meta": ocp.args.JsonRestore(),
        }))
        self.check(step, {WEIGHTS: restored[WEIGHTS], TRAINER: restored[TRAINER]},
                   {"data": restored["data"], "meta": restored["meta"]})
        return {**restored[WEIGHTS], **restored[TRAINER]}, restored["data"], restored["meta"]

    def restore_weights(self, step: int, abstract_weights: dict) -> dict:
        """Only {params, model_state}, e.g. to fine-tune from another run with a fresh optimizer."""
        restored = self.manager.restore(
            step, args=ocp.args.Composite(**{WEIGHTS: ocp.args.StandardRestore(_target(abstract_weights))}))
        self.check(step, {WEIGHTS: restored[WEIGHTS]}, {})
        return restored[WEIGHTS]

    def check(self, step: int, arrays: dict[str, Any], objects: dict[str, Any]) -> None:
        """Compare restored items with the step's digests: DigestMismatch (or DigestFileDamaged)
        if any differ; a note in self.notes if the step predates digests."""
        if not self.verify:
            return
        step_dir = self.directory / str(step)
        record = digests.read_record(step_dir, step)
        if record is None:
            self.notes.append(f"note: checkpoint step {step} has no digests (saved before checksums existed), so its "
                              "content cannot be verified")
            return
        files, names = [], []
        for item, tree in arrays.items():
            bad = digests.bad_arrays(record, {item: tree}, {})
            files += digests.locate(step_dir / item, bad) if bad else []
            names += bad
        bad = digests.bad_arrays(record, {}, objects)
        files += [f"{item}/metadata" for item in bad]
        if names or bad:
            raise digests.DigestMismatch(step, ", ".join(files[:3]) + (f" and {len(files) - 3} more files"
                                                                      if len(files) > 3 else ""), names + bad)

    def restore_merged(self, step: int, abstract_weights: dict, lora_cfg: LoRAConfig, is_moe: bool) -> dict:
        """{params, model_state} of a checkpoint, LoRA adapters (if the run trained some) merged
        into the params: what eval, generation, export and `train.init_from` consume."""
        if lora_cfg.rank == 0:
            weights = self.restore_weights(step, abstract_weights)
            self._print_notes()
            return weights
        adapters = lora.abstract_adapters(abstract_weights["params"], lora_cfg, is_moe)
        weights = self.restore_weights(step, {**abstract_weights, "adapters": adapters})
        self._print_notes()
        return {"params": lora.merge(weights["params"], weights["adapters"], lora_cfg),
                "model_state": weights["model_state"]}

    def _print_notes(self) -> None:
        # eval / generate / export have no run log: a note goes to stderr (kept off --json stdout).
        for note in self.notes:
            print(note, file=sys.stderr)
        self.notes.clear()

    def wait(self) -> None:
        self._finish(self._pending)

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for the last save and close. raise_errors=False when another error is already
        on its way out, which a failed final save must not hide."""
        try:
            self._finish(self._pending)
        except RunError:
            if raise_errors:
                raise
        finally:
            self.manager.close()


def complete_steps(directory: Path) -> list[int]:
    """Steps with a committed directory (unfinished writes carry a `.orbax-checkpoint-tmp` suffix,
    damaged steps moved aside a `.corrupt` one), ascending."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno:
        return f"[Errno {err.errno}] {err.strerror}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


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
