"""`mixtral-jax verify`: check a run's checkpoint steps offline against their digests.

Each step is restored item by item onto one local device (its shapes read from the step's own
metadata, so no config is needed) through the same Checkpointer path that training, eval and
export use, which compares every array and JSON item with the digests saved with the step.
Verdicts: `ok`, `damaged` (the files and arrays, or orbax's own read error), `unverifiable`
(saved before digests existed; the step still restores). Nothing is moved or changed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mixtral_jax.training import digests
from mixtral_jax.training.checkpoint import (TRAINER, WEIGHTS, Checkpointer, complete_steps, describe_read_error,
                                             quiet_async_failures)

JSON_ITEMS = ("data", "meta")


@dataclasses.dataclass
class Verdict:
    step: int
    status: str  # ok | damaged | unverifiable
    detail: str  # what was checked, or what is damaged
    arrays: list[str] = dataclasses.field(default_factory=list)  # the damaged arrays / items, when known

    def line(self) -> str:
        return f"step {self.step}: {self.status}: {self.detail}"


def verify_run(run_dir: Path, step: int | None = None) -> list[Verdict]:
    """Verdicts for every complete step of a run dir (or `step` alone), oldest first."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    steps = complete_steps(ckpt_dir)
    if not steps:
        raise ValueError(f"{run_dir} has no checkpoints to verify")
    if step is not None:
        if step not in steps:
            raise ValueError(f"{run_dir} has no checkpoint step {step} (it has {', '.join(map(str, steps))})")
        steps = [step]
    checkpointer = Checkpointer(ckpt_dir, keep=1_000_000)  # never deletes: keep is only applied on save
    try:
        return [verify_step(checkpointer, s) for s in steps]
    finally:
        checkpointer.close(raise_errors=False)


def verify_step(checkpointer: Checkpointer, step: int) -> Verdict:
    step_dir = checkpointer.directory / str(step)
    try:
        with quiet_async_failures():
            record = digests.read_record(step_dir, step)
            arrays = {item: _restore_item(checkpointer, step, item) for item in (WEIGHTS, TRAINER)
                      if (step_dir / item).is_dir()}
            objects = {item: checkpointer.manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.JsonRestore()}))[item] for item in JSON_ITEMS if (step_dir / item).is_dir()}
            checkpointer.check(step, arrays, objects)
    except (digests.DigestMismatch, digests.DigestFileDamaged) as err:
        return Verdict(step, "damaged", f"{err.file} ({err.reason})", getattr(err, "arrays", []))
    except Exception as err:  # orbax / tensorstore reject the damage themselves
        file, reason = describe_read_error(err, step_dir)
        return Verdict(step, "damaged", f"{file} ({reason})")
    counted = sum(len(jax.tree.leaves(tree)) for tree in arrays.values())
    if record is None:
        checkpointer.notes.clear()
        return Verdict(step, "unverifiable", f"no digests (saved before checksums existed); {counted} arrays and "
                                             f"{len(objects)} JSON items restore")
    return Verdict(step, "ok", f"{counted} arrays and {len(objects)} JSON items match their digests")


def _restore_item(checkpointer: Checkpointer, step: int, item: str) -> Any:
    """A pytree item restored onto the first local device, shaped by its own metadata."""
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(checkpointer.directory / str(step) / item)
    finally:
        handler.close()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata,
                          is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    restored = checkpointer.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))
    return restored[item]
