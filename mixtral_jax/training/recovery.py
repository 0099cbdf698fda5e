"""Choosing the checkpoint a run resumes from, and refusing to resume from a bad one.

Orbax writes each step into `<step>.orbax-checkpoint-tmp...` and renames it to `<step>` only
once it is complete, so a crash (even `kill -9`) mid-write leaves a temporary directory and the
previous step untouched. At start the trainer deletes such leftovers (never a whole checkpoint)
and then restores the newest step that passes every check:

- its files are all there and its JSON files parse (a truncated or missing file is named);
- its arrays have the shapes this config expects: a mismatch means the run dir was trained with
  another config, which is a ConfigError naming the parameter and both shapes, never a fallback;
- the restore itself succeeds (tensorstore notices truncated or missing array data);
- the restored arrays and JSON items match the digests saved with the step (digests.py), which
  catches same-size damage: overwritten bytes, flipped bits, a file swapped in from another step.
  A step saved before digests existed restores with a note that it cannot be verified.

A damaged step is renamed `<step>.corrupt` (kept, not deleted) with a warning once an older good
step is found; if none is good, the run stops with a RunError naming the damaged files and
leaves every directory as it was. The restore returns a complete state or raises: the trainer
never continues from a half-loaded one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mixtral_jax.config import ConfigError
from mixtral_jax.models.params import path_name
from mixtral_jax.training import digests, nonfinite
from mixtral_jax.training.checkpoint import (TRAINER, WEIGHTS, Checkpointer, complete_steps, describe_read_error,
                                             split_state)
from mixtral_jax.training.checkpoint import quiet_async_failures as _quiet_async_failures
from mixtral_jax.training.errors import RunError

TMP_MARKER = ".orbax-checkpoint-tmp"
ITEMS = (WEIGHTS, TRAINER, "data", "meta")
# Files orbax 0.12 writes for every pytree item; their absence means a damaged step.
PYTREE_FILES = ("_METADATA", "manifest.ocdbt")
JSON_ITEM_FILE = "metadata"  # the data / meta items


class DamagedCheckpoint(Exception):
    """A step directory that cannot be restored; `file` is the first damaged path found."""

    def __init__(self, step: int, file: str, reason: str):
        super().__init__(f"step {step}: {file} ({reason})")
        self.step, self.file, self.reason = step, file, reason


def remove_incomplete(directory: Path) -> list[str]:
    """Delete the temporary directories of saves a crash interrupted; returns notes."""
    notes = []
    if Path(directory).is_dir():
        for path in sorted(Path(directory).iterdir()):
            if TMP_MARKER in path.name and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                done = "removed" if not path.exists() else "could not fully remove"
                notes.append(f"{done} {path.name}: an incomplete checkpoint write (interrupted run); "
                             "earlier checkpoints are unaffected")
    return notes


def check_files(step_dir: Path, step: int) -> None:
    """DamagedCheckpoint naming the first missing or unparsable file of a step directory."""
    for item in ITEMS:
        required = [JSON_ITEM_FILE] if item in ("data", "meta") else list(PYTREE_FILES)
        for name in required:
            if not (step_dir / item / name).is_file():
                raise DamagedCheckpoint(step, f"{item}/{name}", "missing")
    json_files = [step_dir / "_CHECKPOINT_METADATA", *(step_dir / i / JSON_ITEM_FILE for i in ("data", "meta"))]
    for item in (WEIGHTS, TRAINER):
        json_files += [step_dir / item / "_METADATA", step_dir / item / "_sharding"]
        json_files += sorted((step_dir / item / "array_metadatas").glob("*"))
    for path in json_files:
        if path.is_file():
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as err:
                raise DamagedCheckpoint(step, str(path.relative_to(step_dir)), f"truncated or not JSON: {err}")


def stored_shapes(step_dir: Path, item: str, step: int) -> dict[str, tuple[int, ...]]:
    """Array name -> shape, read from the item's metadata only (no array data)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(step_dir / item)
    except Exception as err:  # orbax / tensorstore raise many types for a damaged file
        named, reason = describe_read_error(err, step_dir)
        raise DamagedCheckpoint(step, named if named != "." else f"{item}/_METADATA", reason) from None
    finally:
        handler.close()
    leaves = jax.tree_util.tree_flatten_with_path(metadata)[0]
    return {path_name(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def check_shapes(step_dir: Path, target: dict, step: int) -> set[str]:
    """ConfigError if the checkpoint's arrays differ from `target`'s (another model config).
    Returns the top-level trainer entries the checkpoint lacks but may (older checkpoints have
    no non-finite counters)."""
    expected_items = dict(zip((WEIGHTS, TRAINER), split_state(target)))
    optional_missing: set[str] = set()
    for item, tree in expected_items.items():
        stored = stored_shapes(step_dir, item, step)
        wanted = {path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
        missing = sorted(set(wanted) - set(stored))
        if item == TRAINER and nonfinite.COUNTERS in tree:
            counters = {n for n in missing if n.split(".")[0] == nonfinite.COUNTERS}
            if counters:
                optional_missing.add(nonfinite.COUNTERS)
                missing = [n for n in missing if n not in counters]
        problems = [f"{n}: checkpoint {stored[n]} vs this config {wanted[n]}" for n in sorted(wanted)
                    if n in stored and stored[n] != wanted[n]]
        problems += [f"{n}: not in the checkpoint (this config has {wanted[n]})" for n in missing]
        problems += [f"{n}: in the checkpoint {stored[n]}, not in this config"
                     for n in sorted(set(stored) - set(wanted))]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ConfigError(f"checkpoint {step_dir} was saved by a different model or training config: "
                              + "; ".join(problems[:3]) + more
                              + ". Use the config it was trained with, or a new run.name")
    return optional_missing


def verify_latest_shapes(checkpointer: Checkpointer, target: dict) -> None:
    """Fail fast (before the trainer writes its config) if the newest readable step belongs to
    another config; damaged steps are left to `restore_latest_good`."""
    for step in reversed(complete_steps(checkpointer.directory)):
        step_dir = checkpointer.directory / str(step)
        if step == 0 and not (step_dir / TRAINER).is_dir():
            return  # an imported weights-only run dir: the trainer says so
        try:
            with _quiet_async_failures():
                check_files(step_dir, step)
                check_shapes(step_dir, target, step)
            return
        except DamagedCheckpoint:
            continue


def restore_latest_good(checkpointer: Checkpointer, target: dict, *,
                        move_aside: bool = True) -> tuple[int, dict, Any, dict, list[str]] | None:
    """(step, state, data state, meta, notes) of the newest good checkpoint, or None if the
    directory holds no checkpoint at all. See the module docstring for what "good" means.
    move_aside: rename damaged steps (the primary process only, in a multi-process job)."""
    steps = complete_steps(checkpointer.directory)
    if not steps:
        return None
    damaged: list[DamagedCheckpoint] = []
    for step in reversed(steps):
        step_dir = checkpointer.directory / str(step)
        try:
            with _quiet_async_failures():
                check_files(step_dir, step)
                absent = check_shapes(step_dir, target, step)
                restore_target = {k: v for k, v in target.items() if k not in absent}
                state, data_state, meta = _restore(checkpointer, step, step_dir, restore_target)
        except DamagedCheckpoint as bad:
            damaged.append(bad)
            continue
        for key in absent:  # counters an older checkpoint lacks start from zero, laid out like the target
            state[key] = jax.tree.map(lambda z, t: jax.device_put(z, t.sharding), nonfinite.init_counters(),
                                      target[key])
        notes = [_quarantine(checkpointer.directory, bad, step, move_aside) for bad in damaged]
        notes += checkpointer.notes  # "cannot be verified" for a step saved without digests
        checkpointer.notes.clear()
        if damaged:
            if jax.process_count() > 1:
                # Only the primary renames: another process listing the steps before the rename
                # would still count the damaged step, refuse to save over it and strand the
                # primary in the save's barrier.
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("mixtral_jax: damaged checkpoint steps moved aside")
            checkpointer.manager.reload()  # forget the steps moved aside
        return step, state, data_state, meta, notes
    listing = "; ".join(str(bad) for bad in damaged)
    raise RunError(f"no usable checkpoint in {checkpointer.directory}: {listing}. Nothing was changed; move the "
                   "damaged step directories elsewhere to start over, or restore them from a backup")


def _restore(checkpointer: Checkpointer, step: int, step_dir: Path, target: dict) -> tuple[dict, Any, dict]:
    try:
        state, data_state, meta = checkpointer.restore(step, target)
        jax.block_until_ready(state)  # any read error surfaces here, not in the first step
    except (digests.DigestMismatch, digests.DigestFileDamaged) as err:
        raise DamagedCheckpoint(step, err.file, err.reason) from None
    except Exception as err:
        raise DamagedCheckpoint(step, *describe_read_error(err, step_dir)) from None
    return state, data_state, meta


def _quarantine(directory: Path, bad: DamagedCheckpoint, resumed: int, move: bool) -> str:
    # Renamed, not deleted: the damage may be partial and worth recovering by hand. Without the
    # rename orbax would count the step as the latest and overwrite or resume from it.
    dest = directory / f"{bad.step}.corrupt"
    n = 1
    while dest.exists():
        dest, n = directory / f"{bad.step}.corrupt.{n}", n + 1
    if move:
        (directory / str(bad.step)).rename(dest)
    return (f"warning: checkpoint step {bad.step} is damaged ({bad.file}: {bad.reason}); moved it aside to "
            f"{dest.name} and resumed from step {resumed}")
