"""Per-array digests saved with every checkpoint step and checked on every restore.

Orbax notices missing or truncated files, but not same-size damage inside an array's bytes: a
flipped bit decompresses to a wrong weight (or, in an uncompressed chunk, just is one). So each
step gets one more orbax item, `digests/`, written in the same save and committed with the same
rename as the arrays (a step has its digests or is not a step). It holds, per array, a hash of
each saved shard's bytes in C order keyed by the shard's global index (`0:4,0:128`), and a hash
of each JSON item's canonical text (data-iterator position, cost clock). Every process writes
`process_<k>.json` for the shards it saved (replica 0 only), so multi-device and multi-process
saves need no gather; the JSON items' digests come from the primary process, whose copy orbax
writes.

When: the host views of the shards are taken in the blocking part of the save (zero-copy on CPU;
on accelerators the same host copy orbax itself makes, cached on the shard), and hashed in
orbax's background commit thread only once `save()` has returned (the `release` event): hashing
while orbax's blocking part still runs would compete with it for the CPU and the GIL and lengthen
the time the train loop waits. xxh3 releases the GIL, so the train loop keeps running. Orbax
renames the step only after every commit future, this one included, has finished.

Restore hashes the restored arrays at the saved indices: a saved shard lying inside one restored
shard is hashed from that shard's host view; otherwise (restored onto a finer layout) the region
is gathered. So a checkpoint verifies onto any mesh, with one process or many.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from mixtral_jax.training.errors import RunError

ITEM = "digests"
VERSION = 1

try:  # a dependency of wandb, so normally present; ~10x faster than hashlib on a CPU
    import xxhash

    ALGORITHM = "xxh3_128"
except ImportError:  # pragma: no cover - exercised only without xxhash
    xxhash = None
    ALGORITHM = "blake2b_128"


class DigestMismatch(RunError):
    """Restored content differs from what was saved: `arrays` names each bad array or item."""

    def __init__(self, step: int, file: str, arrays: list[str]):
        self.step, self.file, self.arrays = step, file, arrays
        self.reason = "digest mismatch: " + ", ".join(arrays)
        super().__init__(f"checkpoint step {step} is damaged ({file}: {self.reason})")


class DigestFileDamaged(RunError):
    """The digests of a step cannot be read (so nothing in the step can be trusted)."""

    def __init__(self, step: int, file: str, reason: str):
        self.step, self.file, self.reason = step, file, reason
        super().__init__(f"checkpoint step {step} is damaged ({file}: {reason})")


def _hash(buffer: np.ndarray, algorithm: str = ALGORITHM) -> str:
    data = np.ascontiguousarray(buffer).reshape(-1).view(np.uint8)  # canonical: C order bytes
    if algorithm == "xxh3_128":
        if xxhash is None:
            raise RunError("checkpoint digests are xxh3_128 but the xxhash package is not installed")
        return xxhash.xxh3_128_hexdigest(data)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def object_digest(obj: Any, algorithm: str = ALGORITHM) -> str:
    """A JSON item's digest: its canonical text, so a reparsed copy hashes the same."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return _hash(np.frombuffer(text, np.uint8), algorithm)


def _index_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> str:
    return ",".join(f"{s.start or 0}:{n if s.stop is None else s.stop}" for s, n in zip(index, shape))


def _parse_key(key: str) -> tuple[slice, ...]:
    return tuple(slice(*map(int, part.split(":"))) for part in key.split(",")) if key else ()


def _plain(leaf: Any) -> Any:
    """Typed PRNG keys are stored (by orbax too) as their key data."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(leaf)
    return leaf


def _name(path: tuple[Any, ...]) -> str:
    """`opt_state.1.0.mu.blocks.ffn.w_up`: the dotted path orbax keys the array by, without nnx's
    `value` level, so a tree of plain dicts (as `verify` restores) names arrays alike."""
    keys = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
    return ".".join(k for k in keys if k not in ("value", "raw_value"))


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    return [(_name(p), _plain(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def snapshot(arrays: dict[str, Any]) -> list[tuple[str, Any, tuple[int, ...], Any, list[tuple[Any, np.ndarray]]]]:
    """(item, tree path, shape, dtype, [(shard index or None for the whole array, host view)]) of
    every array this process saves (replica 0 only). Runs while the save blocks the train loop,
    so it only takes references: no hashing, no naming, and on CPU no copy (a host view also
    keeps XLA from donating the buffer while it is hashed, as orbax's own view does while it
    writes)."""
    out = []
    for item, tree in arrays.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            leaf = _plain(leaf)
            if not isinstance(leaf, jax.Array):
                leaf = np.asarray(leaf)
                views = [(None, leaf)]
            elif leaf.is_fully_addressable and leaf.sharding.is_fully_replicated:  # skips building Shards
                views = [(None, np.asarray(leaf))]
            else:
                views = [(s.index, np.asarray(s.data)) for s in leaf.addressable_shards if s.replica_id == 0]
            out.append((item, path, leaf.shape, leaf.dtype, views))
    return out


def compute(snap: list, objects: dict[str, str]) -> dict:
    """The record one process writes: names and hashes of its snapshot (the slow part, run off
    the step)."""
    arrays: dict[str, dict] = {}
    for item, path, shape, dtype, views in snap:
        full = tuple(slice(None) for _ in shape)
        shards = {_index_key(full if index is None else index, shape): _hash(view) for index, view in views}
        arrays.setdefault(item, {})[_name(path)] = {"shape": list(shape), "dtype": str(dtype), "shards": shards}
    return {"version": VERSION, "algorithm": ALGORITHM, "arrays": arrays, "objects": objects}


@dataclasses.dataclass
class DigestSave(ocp.args.CheckpointArgs):
    """The save arguments of the digests item: the pytree items and the JSON items to cover.
    `release`: hashing waits for it (set once the blocking part of the save has returned);
    None hashes at once (synchronous saves, which wait for the commit themselves). The thread
    that calls save never waits for it, since only its return sets it."""

    arrays: dict[str, Any]
    objects: dict[str, Any]
    release: threading.Event | None = None
    saver: int = dataclasses.field(default_factory=threading.get_ident)
    snap: list = dataclasses.field(init=False, repr=False)
    object_digests: dict[str, str] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Taken here, before orbax starts on the arrays: measured inside orbax's save, the same
        # host views cost 5-10x the CPU time (its transfers and writers contend for the arrays).
        self.snap = snapshot(self.arrays)
        self.object_digests = _object_digests(self.objects)


@dataclasses.dataclass
class DigestRestore(ocp.args.CheckpointArgs):
    """Orbax wants a restore type per handler; restores check digests through read_record."""


class _CommitWhenAwaited:
    """A commit future whose work runs in the thread that waits for it: orbax's background commit
    thread, which waits for its commit futures in order (directory creation first, then the
    items' writes) and renames the step only after the last. So no thread is started while the
    save blocks the train loop, the item directory exists when the work runs, and a step whose
    digests failed to write is never committed (the error fails the save)."""

    def __init__(self, work: Any):
        self._work, self._lock, self._outcome = work, threading.Lock(), None

    def result(self, timeout: float | None = None) -> None:
        with self._lock:
            if self._outcome is None:
                try:
                    self._work()
                    self._outcome = (None,)
                except BaseException as err:  # kept, so a second wait raises it too
                    self._outcome = (err,)
        if self._outcome[0] is not None:
            raise self._outcome[0]

    def cancel(self) -> None:
        with self._lock:
            if self._outcome is None:
                self._outcome = (RunError("checkpoint digests cancelled with their save"),)


class DigestHandler(ocp.AsyncCheckpointHandler):
    """Writes `process_<k>.json` in the background commit, before orbax renames the step."""

    async def async_save(self, directory: Any, args: DigestSave) -> list[Any]:
        def write() -> None:
            if args.release is not None and threading.get_ident() != args.saver:
                args.release.wait()
            _write(Path(directory), compute(args.snap, args.object_digests))

        return [_CommitWhenAwaited(write)]

    def save(self, directory: Any, args: DigestSave) -> None:
        _write(Path(directory), compute(args.snap, args.object_digests))

    def restore(self, directory: Any, args: Any = None) -> dict:
        return read_record(Path(directory).parent, -1) or {}

    def metadata(self, directory: Any) -> None:
        return None

    def finalize(self, directory: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _object_digests(objects: dict[str, Any]) -> dict[str, str]:
    """Digests of the JSON items, from the primary process only: orbax writes those items from
    its copy, and another process's copy may differ (its own wall clock in `meta`)."""
    return {item: object_digest(value) for item, value in objects.items()} if jax.process_index() == 0 else {}


def _write(directory: Path, record: dict) -> None:
    (directory / f"process_{jax.process_index()}.json").write_text(json.dumps(record))


ocp.args.register_with_handler(DigestHandler, for_save=True)(DigestSave)
ocp.args.register_with_handler(DigestHandler, for_restore=True)(DigestRestore)


def read_record(step_dir: Path, step: int) -> dict | None:
    """The merged digests of a step (every process's file), or None for a step saved before
    digests existed. DigestFileDamaged if a digests file is unreadable."""
    folder = Path(step_dir) / ITEM
    if not folder.is_dir():
        if _declared(Path(step_dir)):  # lost, not old: deleting digests must not skip the check
            raise DigestFileDamaged(step, f"{ITEM}/", "missing, though the step was saved with digests")
        return None
    files = sorted(folder.glob("process_*.json"))
    if not files:
        raise DigestFileDamaged(step, f"{ITEM}/process_0.json", "missing")
    merged: dict = {"arrays": {}, "objects": {}}
    for path in files:
        rel = f"{ITEM}/{path.name}"
        try:
            record = json.loads(path.read_text())
            if record.get("version") != VERSION or not isinstance(record.get("arrays"), dict):
                raise ValueError(f"not a version {VERSION} digests record")
        except (ValueError, UnicodeDecodeError, AttributeError) as err:
            raise DigestFileDamaged(step, rel, f"unreadable: {str(err)[:120]}") from None
        if merged.setdefault("algorithm", record.get("algorithm")) != record.get("algorithm"):
            raise DigestFileDamaged(step, rel, "digest algorithms differ between processes")
        for item, entries in record["arrays"].items():
            for name, entry in entries.items():
                into = merged["arrays"].setdefault(item, {}).setdefault(name, {**entry, "shards": {}})
                into["shards"].update(entry["shards"])
        merged["objects"].update(record.get("objects", {}))
    return merged


def _declared(step_dir: Path) -> bool:
    """Whether orbax's step metadata lists a digests item."""
    try:
        return ITEM in json.loads((step_dir / "_CHECKPOINT_METADATA").read_text()).get("item_handlers", {})
    except (OSError, ValueError, AttributeError):
        return False


def _region_digest(arr: jax.Array, region: tuple[slice, ...], algorithm: str) -> str | None:
    """The digest of `arr[region]`, or None where another process owns the restored shard that
    holds it. Which shard is chosen depends on the global layout only, so every process makes
    the same choice (the gather below is a collective)."""
    index_map = arr.sharding.devices_indices_map(arr.shape)
    holders = sorted((d.id, d, idx) for d, idx in index_map.items() if _contains(idx, region, arr.shape))
    if holders:
        _, device, index = holders[0]
        if device.process_index != jax.process_index():
            return None
        shard = next(s for s in arr.addressable_shards if s.device == device)
        local = tuple(slice(r.start - (i.start or 0), r.stop - (i.start or 0)) for r, i in zip(region, index))
        return _hash(np.asarray(shard.data)[local], algorithm)
    if arr.is_fully_addressable:
        return _hash(np.asarray(arr)[region], algorithm)
    replicated = jax.sharding.NamedSharding(arr.sharding.mesh, jax.sharding.PartitionSpec())
    return _hash(np.asarray(jax.jit(lambda a: a[region], out_shardings=replicated)(arr)), algorithm)


def _contains(index: tuple[slice, ...], region: tuple[slice, ...], shape: tuple[int, ...]) -> bool:
    return all((i.start or 0) <= r.start and r.stop <= (n if i.stop is None else i.stop)
               for i, r, n in zip(index, region, shape))


def bad_arrays(record: dict, arrays: dict[str, Any], objects: dict[str, Any]) -> list[str]:
    """Names of the restored arrays (`item` -> pytree) and JSON items whose content differs
    from the digests recorded at save, in a fixed order; agreed across processes."""
    algorithm, bad = record.get("algorithm", ALGORITHM), []
    for item, tree in arrays.items():
        recorded = record["arrays"].get(item, {})
        for name, leaf in _leaves(tree):
            entry = recorded.get(name)
            if entry is None or list(np.shape(leaf)) != entry["shape"] or str(leaf.dtype) != entry["dtype"]:
                bad.append(name)
                continue
            leaf = leaf if isinstance(leaf, jax.Array) else jax.numpy.asarray(leaf)
            for key, digest in entry["shards"].items():
                got = _region_digest(leaf, _parse_key(key), algorithm)
                if got is not None and got != digest:
                    bad.append(name)
                    break
    for item, value in objects.items():
        if record["objects"].get(item) != object_digest(value, algorithm):
            bad.append(item)
    if jax.process_count() > 1:  # a damaged shard is seen by its owner only: agree on the union
        names = [name for item, tree in arrays.items() for name, _ in _leaves(tree)] + list(objects)
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([n in bad for n in names], np.int32))
        bad = [n for n, flag in zip(names, np.asarray(flags).reshape(-1, len(names)).max(0)) if flag]
    return bad


def orbax_name(key: str) -> str:
    """`opt_state.1.0.mu.embed.value` (an OCDBT key's array part) as _name spells it."""
    return ".".join(p for p in key.split(".") if p not in ("value", "raw_value"))


def locate(item_dir: Path, names: list[str]) -> list[str]:
    """The files (relative to the step dir) holding the chunks of `names`, read from the item's
    OCDBT tree: where the damage is, for the message. Best effort: the item dir if unreadable."""
    import tensorstore as ts

    wanted = set(names)
    found: list[str] = []
    try:
        kv = ts.KvStore.open({"driver": "file", "path": str(item_dir) + "/"}).result()
        pending = [ts.ocdbt.dump(kv).result()["versions"][-1]["root"]["location"]]
        while pending:
            location = pending.pop()
            node_file = location.removeprefix("btreenode::").rsplit(":", 2)[0]
            for entry in ts.ocdbt.dump(kv, location).result().get("entries", []):
                child = entry.get("location") or entry.get("node")
                if isinstance(child, str) and child.startswith("btreenode::"):
                    pending.append(child)
                    continue
                key = entry.get("key", b"")
                key = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
                if key.endswith(".zarray") or orbax_name(key.split("/")[0]) not in wanted:
                    continue
                ref = entry.get("indirect_value")
                path = re.sub(r"^value:(.*?):(.*):\d+:\d+$", r"\1\2", ref) if ref else node_file
                if path not in found:
                    found.append(path)
    except Exception:  # a damaged tree is named by orbax's own error; this is only a pointer
        return [f"{item_dir.name}/"]
    return [f"{item_dir.name}/{p}" for p in found] or [f"{item_dir.name}/"]
