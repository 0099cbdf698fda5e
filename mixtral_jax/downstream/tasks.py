"""The shipped downstream task, `python_next_line`: built offline from the embedded corpus's
held-out split, in lm-eval-harness's own YAML task format, so every run on every machine has a
downstream number without a download.

An item shows the last lines of a held-out Python file (the context) and asks which of four lines
comes next: the true next line, or one of three lines taken from other held-out files. The model
scores each choice's log-likelihood given the context (lm-eval `multiple_choice`; metrics `acc`
and `acc_norm`, the latter per byte); chance is 25 %.

How the items are drawn (deterministic: the same stdlib gives the same items on every machine):
- files: the `python_source` validation split only (~3 % of the stdlib's files, by a hash of the
  path), which training on the embedded corpus never sees;
- targets: code lines (not blank, not comments, not inside a multi-line string such as a
  docstring) of 12 to 100 characters after the indentation, with at least 2 lines of context;
  at most `PER_FILE` items per file, so large files do not dominate;
- context: up to `CONTEXT_LINES` lines before the target (at most `CONTEXT_CHARS` characters,
  whole lines), each with its newline;
- distractors: code lines drawn under the same rules from other held-out files, whose text
  appears nowhere in the target's file, all different, of similar length and given the target's
  indentation, so neither length nor indentation tells the answer. Lengths (indentation
  excluded): all four lie in a window [c / 1.33, c x 1.33] whose centre c is drawn around the
  target's length so that the true line is as often the longest, shortest or a middle one as
  any other choice. The true line's position among the four is drawn at random;
- a choice is the whole line with its newline, so the model also scores where the line ends.

`write_task(directory)` writes `python_next_line.yaml` + `python_next_line.jsonl` into a
directory; `shipped_task_dir()` builds them once under the cache and returns that directory, for
lm-eval's `TaskManager(include_path=...)`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import tokenize
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TASK = "python_next_line"
VERSION = 1  # bump when the items change; names the cache entry and lm-eval's metadata version
N_ITEMS = 500
N_CHOICES = 4
PER_FILE = 12
CONTEXT_LINES = 8
CONTEXT_CHARS = 600
MIN_CONTEXT_LINES = 2
MIN_CHARS, MAX_CHARS = 12, 100  # of a target line, indentation excluded
LENGTH_RATIO = 4 / 3  # a distractor's stripped length is within [1 / r, r] x the target's
SEED = 20240501

YAML = """\
# Shipped with mixtral_jax (mixtral_jax/downstream/tasks.py): built from the embedded corpus's
# held-out split; regenerate with `python -m mixtral_jax.downstream.tasks DIR`.
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}.0
  n_items: {n_items}
  corpus: python_source/{corpus}
"""


def code_lines(text: str) -> list[bool] | None:
    """Per line of `text` (as `splitlines(keepends=True)` cuts it): whether it is a code line,
    i.e. not blank, not a comment line, not inside (or the continuation of) a multi-line string.
    None if Python's tokenizer cannot read the file (deliberately broken test fixtures)."""
    lines = text.splitlines(keepends=True)
    code = [bool(line.strip()) and not line.lstrip().startswith("#") for line in lines]
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            (start, _), (end, _) = token.start, token.end
            if token.type == tokenize.STRING and end > start:
                for row in range(start, end + 1):  # tokenize counts rows from 1
                    if 0 <= row - 1 < len(code):
                        code[row - 1] = False
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    return code


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _candidates(files: Sequence[tuple[str, str]]) -> tuple[list[tuple[int, int]], list[list[str]],
                                                           list[list[int]]]:
    """(targets as (file, line) pairs, each file's lines, each file's usable code line indices)."""
    targets: list[tuple[int, int]] = []
    all_lines: list[list[str]] = []
    usable: list[list[int]] = []
    for f, (_, text) in enumerate(files):
        lines = text.splitlines(keepends=True)
        all_lines.append(lines)
        code = code_lines(text)
        if code is None:
            usable.append([])
            continue
        good = [i for i, is_code in enumerate(code)
                if is_code and MIN_CHARS <= len(lines[i].strip()) <= MAX_CHARS]
        usable.append(good)
        targets += [(f, i) for i in good if i >= MIN_CONTEXT_LINES]
    return targets, all_lines, usable


def _context(lines: list[str], i: int) -> str:
    start = max(0, i - CONTEXT_LINES)
    while i - start > MIN_CONTEXT_LINES and sum(len(l) for l in lines[start:i]) > CONTEXT_CHARS:
        start += 1
    return "".join(lines[start:i])


def build_items(files: Sequence[tuple[str, str]], n_items: int = N_ITEMS, seed: int = SEED) -> list[dict[str, Any]]:
    """The task's items from (path, text) pairs of held-out files (sorted by path for a stable
    order). Each item: {"id", "path", "line" (1-based), "context", "choices" (4 lines with their
    newline), "gold" (index of the true line)}. Deterministic in `files` and `seed`."""
    files = sorted(files)
    rng = np.random.default_rng(seed)
    targets, all_lines, usable = _candidates(files)
    line_sets = [{line.strip() for line in lines} for lines in all_lines]
    pool = [(f, i) for f, good in enumerate(usable) for i in good]
    pool_text = [all_lines[f][i].strip() for f, i in pool]
    pool_len = np.asarray([len(t) for t in pool_text])
    pool_file = np.asarray([f for f, _ in pool])

    items: list[dict[str, Any]] = []
    per_file = [0] * len(files)
    for t in rng.permutation(len(targets)):
        if len(items) == n_items:
            break
        f, i = targets[int(t)]
        if per_file[f] >= PER_FILE:
            continue
        line = all_lines[f][i]
        text, indent = line.strip(), _indent(line)
        # The length window [c / r, c * r] has its centre c drawn so that the target's length is
        # anywhere in it (log-uniformly): a window centred on the target would put the true line
        # in the middle of the choices' lengths more often than chance.
        centre = len(text) * LENGTH_RATIO ** rng.uniform(-1.0, 1.0)
        near = np.flatnonzero((pool_file != f) & (pool_len * LENGTH_RATIO >= centre)
                              & (pool_len <= centre * LENGTH_RATIO))
        distractors: list[str] = []
        for j in rng.permutation(near):
            other = pool_text[int(j)]
            if other not in line_sets[f] and other not in distractors:
                distractors.append(other)
                if len(distractors) == N_CHOICES - 1:
                    break
        if len(distractors) < N_CHOICES - 1:
            continue
        gold = int(rng.integers(N_CHOICES))
        choices = [indent + d + "\n" for d in distractors]
        choices.insert(gold, line if line.endswith("\n") else line + "\n")
        per_file[f] += 1
        items.append({"id": f"{files[f][0]}:{i + 1}", "path": files[f][0], "line": i + 1,
                      "context": _context(all_lines[f], i), "choices": choices, "gold": gold})
    items.sort(key=lambda item: (item["path"], item["line"]))
    return items


def heldout_files() -> list[tuple[str, str]]:
    """(path, text) of every file in the embedded corpus's validation split."""
    import tensorflow_datasets as tfds

    from mixtral_jax.data import corpus

    data_dir = corpus.build_python_source()
    source = tfds.data_source(f"{corpus.PYTHON_SOURCE_NAME}/{corpus.PYTHON_SOURCE_CONFIG}", split="validation",
                              data_dir=str(data_dir), download=False)

    def text(value: Any) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    return sorted((text(record["path"]), text(record["text"])) for record in (source[i] for i in range(len(source))))


def _write(directory: Path, items: Sequence[dict[str, Any]], final: Path) -> Path:
    """The two files into `directory`, the YAML naming the JSONL as it will be found in `final`."""
    from mixtral_jax.data.corpus import PYTHON_SOURCE_CONFIG

    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    yaml_path = directory / f"{TASK}.yaml"
    yaml_path.write_text(YAML.format(task=TASK, data=json.dumps(str(final / data.name)), version=VERSION,
                                     n_items=len(items), corpus=PYTHON_SOURCE_CONFIG), encoding="utf-8")
    return yaml_path


def write_task(directory: str | os.PathLike, items: Sequence[dict[str, Any]] | None = None) -> Path:
    """Write `python_next_line.yaml` and `python_next_line.jsonl` (the items, built from the
    held-out split unless given) into `directory`; return the YAML's path. The YAML names the
    JSONL by absolute path (lm-eval hands `data_files` to `datasets.load_dataset("json")`)."""
    directory = Path(directory).expanduser().resolve()
    return _write(directory, build_items(heldout_files()) if items is None else list(items), directory)


def shipped_task_dir(cache: str | os.PathLike | None = None) -> Path:
    """shipped_task_dir(cache=None) -> Path: the directory holding the shipped task
    (`python_next_line.yaml` + `.jsonl`), built on first use (a few seconds, after the embedded
    corpus) under `cache` (default: the package cache, `$MIXTRAL_JAX_CACHE` or
    ~/.cache/mixtral_jax) as `downstream/python_next_line-<python version>-v<VERSION>/`.
    Pass it to lm-eval as `TaskManager(include_path=str(shipped_task_dir()))`. Safe to call
    from several processes at once (a file lock; the directory appears complete or not at all)."""
    from mixtral_jax.data.cache import cache_dir, file_lock
    from mixtral_jax.data.corpus import PYTHON_SOURCE_CONFIG

    root = (Path(cache).expanduser() if cache is not None else cache_dir()).resolve()
    target = root / "downstream" / f"{TASK}-{PYTHON_SOURCE_CONFIG}-v{VERSION}"
    if (target / f"{TASK}.yaml").is_file():
        return target
    with file_lock(root / "downstream" / f".{target.name}.lock"):
        if not (target / f"{TASK}.yaml").is_file():
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
            try:
                _write(staging, build_items(heldout_files()), target)
                shutil.rmtree(target, ignore_errors=True)  # a partial entry from a killed build
                os.replace(staging, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":  # python -m mixtral_jax.downstream.tasks DIR
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m mixtral_jax.downstream.tasks DIR")
    print(write_task(sys.argv[1]))
