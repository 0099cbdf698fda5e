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
restore_weights, the one restore of eval, generate, export, upcycle and `train.init_from`, turns
that and the damage orbax rejects itself (an undecodable or truncated chunk) into DamagedStep:
one line, the original error chained.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

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
        self.verify, self.async_save = verify, async_save
        self.notes: list[str] = []  # one line per restored step that has no digests to check
        self._pending: int | None = None  # the step whose background write may still be running

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_state: Any, meta: dict) -> None:
        """Start an asynchronous save of the train state (split into weights and trainer parts).
        Raises RunError if this save or the previous (background) one failed."""
        self._finish(self._pending)  # orbax waits for the previous save anyway; this names its step
        weights, trainer = split_state(state)
        # Digests are hashed once this save has stopped blocking; a synchronous save commits
        # inside manager.save, so nothing may wait for it to return.
        release = threading.Event() if self.async_save else None
        args = ocp.args.Composite(**{
            WEIGHTS: ocp.args.StandardSave(weights),
            TRAINER: ocp.args.StandardSave(trainer),
            "data": ocp.args.JsonSave(data_state),
            "meta": ocp.args.JsonSave(meta),
            **self.digest_args({WEIGHTS: weights, TRAINER: trainer}, {"data": data_state, "meta": meta}, release),
        })
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as err:
            raise self._save_error(step, err) from err
        finally:
            if release is not None:
                release.set()  # also on failure: a commit thread must never wait forever
        self._pending = step

    def digest_args(self, arrays: dict[str, Any], objects: dict[str, Any],
                    release: threading.Event | None = None) -> dict[str, Any]:
        """The digests item of a Composite save covering these items (none with verify=False);
        `release`: see digests.DigestSave."""
        return {digests.ITEM: digests.DigestSave(arrays, objects, release)} if self.verify else {}

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
        """Only {params, model_state}, e.g. to fine-tune from another run with a fresh optimizer.
        Damage, whether the digests or orbax itself find it, is a DamagedStep (one line); a
        checkpoint of another shape or structure stays orbax's ValueError, for the caller to
        report as a config mismatch."""
        step_dir = self.directory / str(step)
        try:
            with quiet_async_failures():
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(**{WEIGHTS: ocp.args.StandardRestore(_target(abstract_weights))}))
                jax.block_until_ready(restored[WEIGHTS])  # a read error surfaces here, not at first use
                self.check(step, {WEIGHTS: restored[WEIGHTS]}, {})
        except (digests.DigestMismatch, digests.DigestFileDamaged) as err:
            raise DamagedStep(step, err.file, err.reason, self.directory) from err
        except Exception as err:
            if _is_mismatch(err):
                raise
            raise DamagedStep(step, *describe_read_error(err, step_dir), self.directory) from err
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


class DamagedStep(RunError):
    """A step that eval, generate, export, upcycle or `train.init_from` cannot use: one line naming
    the step, the file and the arrays, and where `mixtral-jax verify` gives every step's verdict.
    The error orbax or the digests raised stays chained."""

    def __init__(self, step: int, file: str, reason: str, directory: Path):
        self.step, self.file, self.reason = step, file, reason
        run = directory.parent if directory.name == "checkpoints" else directory
        super().__init__(f"checkpoint step {step} is damaged ({file}: {reason}); nothing was loaded from it; "
                         f"`mixtral-jax verify --run {run}` checks every step")


def _chain(err: BaseException) -> list[BaseException]:
    """The error and the ones it was raised from: orbax puts tensorstore's reason in __cause__."""
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


# tensorstore's "<STATUS>: Error reading "<key>" in OCDBT database at local file "<dir>": <why>"
_READ_ERROR = re.compile(r'[A-Z_]+: Error reading "([^"]+)" in OCDBT database at [^"]*"[^"]*": ([^\n]*)')


def _is_mismatch(err: BaseException) -> bool:
    """orbax's ValueError for a target of another shape or tree structure (a config mismatch),
    as opposed to a read or decode failure (damage)."""
    chain = _chain(err)
    return (isinstance(err, ValueError) and not isinstance(err, (json.JSONDecodeError, UnicodeDecodeError))
            and not any(_READ_ERROR.search(str(e)) or "NOT_FOUND" in str(e) for e in chain))


def describe_read_error(err: BaseException, step_dir: Path) -> tuple[str, str]:
    """(file relative to the step dir, short reason) of an error orbax or tensorstore raised
    reading a step: tensorstore's messages run to kilobytes of spec. The file is the one the
    message names; where it names only an item, the data file holding the array's chunks."""
    texts = [str(e) for e in _chain(err)]
    text = "\n".join(texts)
    found = re.findall(re.escape(str(step_dir)) + r"/([^\s\"'\\]*)", text)
    files = [f.rstrip("/:,)") for f in found if f.rstrip("/")]
    file = max(files, key=len) if files else "."
    read = _READ_ERROR.search(text)
    spec = re.search(r"'path': '([^']+?)/?'", text)
    array = digests.orbax_name(read.group(1).split("/")[0]) if read else (
        digests.orbax_name(spec.group(1)) if spec else None)
    if array and file != "." and "/" not in file and (step_dir / file).is_dir():
        file = digests.locate(step_dir / file, [array])[0].rstrip("/")
    truncated = re.search(r"Requested byte range \[[^)]*\) is not valid for value of size \d+", text)
    if truncated:
        why = f"truncated: {truncated.group(0)}"
    elif "NOT_FOUND" in text or isinstance(err, FileNotFoundError):
        why = "a file it refers to is missing"
    elif read:
        why = read.group(2).strip()[:160]
    else:
        lines = texts[0].strip().splitlines()
        why = f"{type(err).__name__}: {lines[0][:160] if lines else ''}"
    return file, f"reading {array}: {why}" if array else why


@contextlib.contextmanager
def quiet_async_failures() -> Iterator[None]:
    """Reading a damaged checkpoint leaves orbax's failed asyncio tasks and closed event loops
    behind; collected later they print screens of tracebacks that would bury the one-line
    warning or error. Collect them here, with those two kinds of report silenced."""
    asyncio_log = logging.getLogger("asyncio")
    level, hook = asyncio_log.level, sys.unraisablehook

    def unraisable(info: Any) -> None:
        if not (isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value)):
            hook(info)

    asyncio_log.setLevel(logging.CRITICAL)
    sys.unraisablehook = unraisable
    try:
        yield
    finally:
        gc.collect()
        asyncio_log.setLevel(level)
        sys.unraisablehook = hook


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
