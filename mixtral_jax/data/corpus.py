"""Document readers: random-access sequences of text strings, split into train / validation.

- the embedded corpus: the Python standard library's own .py files, built once as a
  tensorflow-datasets dataset in array_record format (`python_source`);
- any prepared tfds dataset, read with `tfds.data_source` (`tfds_source`);
- JSON lines (`read_jsonl`) and directories of text files (`read_text_dir`), split by content
  (`split_by_content`).
Which reader a `data.source` value selects is sources.py's registry. Everything is read through
`tfds.data_source` / plain Python, so TensorFlow is never imported.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import logging
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mixtral_jax.data.cache import cache_dir, file_lock

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
VALIDATION_PER_10K = 300  # ~3% of documents are held out
PYTHON_SOURCE_NAME = "mixtral_jax_python_source"
# The corpus is whatever stdlib this interpreter ships, so its version names the tfds config.
PYTHON_SOURCE_CONFIG = "py{}_{}_{}".format(*sys.version_info[:3])


def is_validation_key(key: str | bytes) -> bool:
    """Deterministic ~3% hold-out by a stable hash (never Python's salted `hash`)."""
    data = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 < VALIDATION_PER_10K


class Documents(Sequence[str]):
    """A random-access view of documents: `len(docs)`, `docs[i] -> str` (for instruct
    sources a conversation: a tuple of (role, content) pairs).

    Wraps either an in-memory list of strings / conversations or a tfds data source (whose records are
    dicts; the text is under `text_key`), optionally restricted to a subset of indices.
    """

    def __init__(self, base: Sequence[Any], text_key: str | None = None,
                 indices: np.ndarray | None = None, name: str = ""):
        self._base = base
        self._key = text_key
        self._indices = indices
        self.name = name

    def __len__(self) -> int:
        return len(self._indices) if self._indices is not None else len(self._base)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index = int(index) % len(self)
        record = self._base[int(self._indices[index]) if self._indices is not None else index]
        if isinstance(record, tuple):  # an instruct conversation, kept structured
            return record
        if self._key is not None:
            record = record[self._key]
        if isinstance(record, np.ndarray):  # tfds may hand back 0-d object arrays
            record = record.item()
        return record.decode("utf-8", "replace") if isinstance(record, bytes) else str(record)

    def __repr__(self) -> str:
        return f"Documents({self.name!r}, n={len(self)})"


# ---------------------------------------------------------------- python_source (tfds)


def _stdlib_files(root: Path) -> list[str]:
    """Relative paths of the stdlib's .py files, sorted, with third-party packages pruned."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        rel_dir = Path(dirpath).relative_to(root)
        out += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(out)


def _python_source_builder_cls() -> type:
    """Define (once) the tfds builder; deferred so importing this module stays cheap."""
    import tensorflow_datasets as tfds

    cached = globals().get("_BUILDER_CLS")
    if cached is not None:
        return cached

    class MixtralJaxPythonSource(tfds.core.GeneratorBasedBuilder):
        """The Python standard library's .py files; split by a hash of the path."""

        VERSION = tfds.core.Version("1.0.0")
        # No code_path: tfds would look for checksum files next to this module, which
        # needs the optional `importlib_resources` package; this builder downloads nothing.
        code_path = None
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=PYTHON_SOURCE_CONFIG)]

        def _info(self) -> Any:
            # DatasetInfo directly: dataset_info_from_configs wants package metadata files.
            return tfds.core.DatasetInfo(
                builder=self,
                description="Python standard library source files (UTF-8 only).",
                features=tfds.features.FeaturesDict(
                    {"text": tfds.features.Text(), "path": tfds.features.Text()}),
                disable_shuffling=True,  # keep path order: reproducible across builds
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            root = Path(sysconfig.get_paths()["stdlib"])
            files = _stdlib_files(root)
            held_out = [f for f in files if is_validation_key(f)]
            train = [f for f in files if not is_validation_key(f)]
            return {"train": self._generate_examples(root, train),
                    "validation": self._generate_examples(root, held_out)}

        def _generate_examples(self, root: Path, files: list[str]) -> Iterator[tuple[str, dict]]:
            for rel in files:
                try:
                    text = (root / rel).read_bytes().decode("utf-8")
                except (UnicodeDecodeError, OSError):
                    continue  # a few test fixtures are deliberately not UTF-8
                yield rel, {"text": text, "path": rel}

    globals()["_BUILDER_CLS"] = MixtralJaxPythonSource
    return MixtralJaxPythonSource


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """tfds narrates a 'download' that does not happen, on stdout and through absl."""
    from absl import logging as absl_logging

    previous = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logging.set_verbosity(previous)


def python_source_dir() -> Path:
    return cache_dir() / "tfds"


def build_python_source(data_dir: Path | None = None) -> Path:
    """Prepare the python_source tfds dataset if it is not there yet; return its data_dir."""
    import tensorflow_datasets as tfds

    data_dir = Path(data_dir or python_source_dir())
    builder_cls = _python_source_builder_cls()  # defining it registers the name with tfds
    info = data_dir / PYTHON_SOURCE_NAME / PYTHON_SOURCE_CONFIG / str(builder_cls.VERSION)
    if (info / "dataset_info.json").is_file():  # fast path without touching tfds
        return data_dir
    with file_lock(data_dir / f".{PYTHON_SOURCE_NAME}.lock"), _quiet_tfds():
        builder = builder_cls(config=PYTHON_SOURCE_CONFIG, data_dir=str(data_dir),
                              file_format="array_record")
        if not builder.is_prepared():  # another process may have built it meanwhile
            print(f"building the embedded python_source corpus into {data_dir} (one time)", file=sys.stderr)
            tfds.disable_progress_bar()
            builder.download_and_prepare()
    return data_dir


def python_source(split: str) -> Documents:
    import tensorflow_datasets as tfds

    data_dir = build_python_source()
    source = tfds.data_source(f"{PYTHON_SOURCE_NAME}/{PYTHON_SOURCE_CONFIG}", split=split,
                              data_dir=str(data_dir), download=False)
    return Documents(source, "text", name=f"python_source:{split}")


# ---------------------------------------------------------------- tfds:NAME[/CONFIG]


def _split_mix(n: int) -> np.ndarray:
    """Stable per-index pseudo-random 0..9999 (splitmix64), vectorised for big datasets."""
    x = np.arange(n, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x % np.uint64(10_000)


def tfds_source(spec: str, text_key: str, split: str) -> Documents:
    import tensorflow_datasets as tfds

    try:  # TFDS_DATA_DIR read now: tfds itself only reads it when first imported
        builder = tfds.builder(spec, data_dir=os.environ.get("TFDS_DATA_DIR"))
    except Exception as err:  # tfds raises several types for unknown names/configs
        raise ValueError(f"data.source 'tfds:{spec}': unknown tfds dataset ({err})") from None
    if not builder.is_prepared():
        raise ValueError(f"data.source 'tfds:{spec}': not prepared under {builder.data_dir_root}; "
                         f"prepare it first (e.g. `tfds build {spec} --file_format=array_record`)")
    splits = set(builder.info.splits.keys())
    features = getattr(builder.info.features, "keys", lambda: [])()
    if text_key not in features:
        raise ValueError(f"data.source 'tfds:{spec}' has no feature '{text_key}' "
                         f"(data.text_key); features: {', '.join(sorted(features))}")
    if "train" not in splits:
        raise ValueError(f"data.source 'tfds:{spec}' has no 'train' split (splits: {sorted(splits)})")
    held_out = next((s for s in ("validation", "test") if s in splits), None)
    try:
        if held_out is not None:  # the dataset's own held-out split
            source = builder.as_data_source(split="train" if split == "train" else held_out)
            return Documents(source, text_key, name=f"tfds:{spec}:{split}")
        # No held-out split: carve ~3% of train by a stable hash of the record index.
        source = builder.as_data_source(split="train")
    except Exception as err:
        raise ValueError(f"data.source 'tfds:{spec}': cannot read it with tfds.data_source "
                         f"(it must be prepared as array_record): {err}") from None
    held = _split_mix(len(source)) < VALIDATION_PER_10K
    indices = np.flatnonzero(held if split == "validation" else ~held)
    return Documents(source, text_key, indices=indices, name=f"tfds:{spec}:{split}")


# ---------------------------------------------------------------- jsonl:PATH and text:DIR


def split_by_content(docs: list, split: str, name: str, keys: list[str] | None = None) -> Documents:
    """Hash split on document content, or on `keys` (one string per document) for documents
    that are not strings (duplicates land on the same side). With two or more documents each
    side gets at least one, so training and evaluation always have data."""
    keys = docs if keys is None else keys
    held = [is_validation_key(k) for k in keys]
    if len(docs) >= 2 and (all(held) or not any(held)):
        digests = [hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest() for k in keys]
        if not any(held):
            held[min(range(len(docs)), key=digests.__getitem__)] = True
        else:  # tiny corpora: keep at least one training document as well
            held[max(range(len(docs)), key=digests.__getitem__)] = False
    chosen = [d for d, h in zip(docs, held) if h == (split == "validation")]
    return Documents(chosen, name=f"{name}:{split}")


def read_jsonl(pattern: str, text_key: str) -> list[str]:
    """The `text_key` strings of every JSON-lines file matching `pattern`. Bad lines (not
    UTF-8, not JSON, no non-empty string field) are skipped and counted in one warning; an error
    names the files when nothing usable remains."""
    paths = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise ValueError(f"data.source 'jsonl:{pattern}': no such file")
    docs: list[str] = []
    lines = bad_utf8 = bad_json = missing = 0
    unreadable: list[str] = []
    for path in paths:
        try:
            handle = open(path, "rb")  # bytes: a non-UTF-8 line is counted, not silently replaced
        except OSError as err:
            unreadable.append(f"{path} ({err.strerror or err})")
            continue
        with handle:
            for raw in handle:
                if not raw.strip():
                    continue  # blank lines (e.g. a trailing newline) are not records
                lines += 1
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    bad_utf8 += 1
                    continue
                except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
                    bad_json += 1
                    continue
                text = record.get(text_key) if isinstance(record, dict) else None
                if not isinstance(text, str) or not text:
                    missing += 1
                    continue
                docs.append(text)
    counts = (f"{bad_utf8} not UTF-8, {bad_json} invalid JSON, {missing} without a non-empty string "
              f"field '{text_key}' (data.text_key)")
    if bad_utf8 or bad_json or missing or unreadable:
        log.warning("jsonl:%s: skipped %d line(s) of invalid JSON and %d record(s) without a non-empty string "
                    "field '%s' (%s); unreadable: %s", pattern, bad_utf8 + bad_json, missing, text_key, counts,
                    "; ".join(unreadable) or "none")
    if not docs:
        files = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        if not lines and not unreadable:
            raise ValueError(f"data.source 'jsonl:{pattern}': {files} has no records (empty)")
        problem = f"could not read {'; '.join(unreadable)}; " if unreadable else ""
        raise ValueError(f"data.source 'jsonl:{pattern}': no usable records with a string field '{text_key}' "
                         f"(data.text_key) in {files}: {problem}{lines} line(s): {counts}")
    return docs


def read_text_dir(root: str) -> list[str]:
    """Every UTF-8 text file under `root`; binary / unreadable ones skipped, counted, warned about."""
    base = Path(os.path.expanduser(root))
    if not base.is_dir():
        raise ValueError(f"data.source 'text:{root}': not a directory")
    docs: list[str] = []
    files = skipped = unreadable = blank = 0
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(base).parts):
            continue  # .git and friends are not corpus text
        files += 1
        try:
            data = path.read_bytes()
        except OSError:  # permissions, a file removed meanwhile
            unreadable += 1
            continue
        try:
            if b"\x00" in data:  # valid UTF-8 can hold NUL, text files practically never do
                raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            skipped += 1
            continue
        if text.strip():
            docs.append(text)
        else:
            blank += 1
    if skipped or unreadable:
        log.warning("text:%s: skipped %d binary or non-UTF-8 file(s) and %d unreadable file(s)",
                    root, skipped, unreadable)
    if not docs:
        if not files:
            raise ValueError(f"data.source 'text:{root}': the directory has no files")
        raise ValueError(f"data.source 'text:{root}': no UTF-8 text files found among {files} file(s) "
                         f"({skipped} binary or non-UTF-8, {unreadable} unreadable, {blank} empty)")
    return docs
