"""The shipped downstream task `python_next_line` (mixtral_jax/downstream/tasks.py): its items come
from the embedded corpus's held-out files only, each has exactly one true next line, the build is
deterministic, lm-eval finds the task and builds its requests with no network, and simple
baselines (choice length, character frequencies, the answer's position) stay near chance."""

from __future__ import annotations

import json
import math
import socket
from collections import Counter

import numpy as np
import pytest

from mixtral_jax.data import corpus
from mixtral_jax.downstream import tasks


@pytest.fixture(scope="module")
def files(corpus_cache) -> list[tuple[str, str]]:
    return tasks.heldout_files()


@pytest.fixture(scope="module")
def items(files) -> list[dict]:
    return tasks.build_items(files)


@pytest.fixture(scope="module")
def task_dir(corpus_cache):
    return tasks.shipped_task_dir()


def _train_paths() -> set[str]:
    import tensorflow_datasets as tfds

    source = tfds.data_source(f"{corpus.PYTHON_SOURCE_NAME}/{corpus.PYTHON_SOURCE_CONFIG}", split="train",
                              data_dir=str(corpus.build_python_source()), download=False)
    return {source[i]["path"].decode() for i in range(len(source))}


def test_items_come_only_from_heldout_files(files, items):
    assert len(items) == tasks.N_ITEMS
    paths = {path for path, _ in files}
    assert paths == {path for path, _ in files if corpus.is_validation_key(path)}
    assert len(files) == len(corpus.python_source("validation"))
    assert not paths & _train_paths()
    used = Counter(item["path"] for item in items)
    assert set(used) <= paths and len(used) >= 30 and max(used.values()) <= tasks.PER_FILE
    text = dict(files)
    for item in items:
        lines = text[item["path"]].splitlines(keepends=True)
        i = item["line"] - 1
        # The context is the file's lines just before the target: never text from elsewhere.
        assert "".join(lines[:i]).endswith(item["context"]) and item["context"].count("\n") >= tasks.MIN_CONTEXT_LINES


def test_exactly_one_choice_is_the_true_next_line(files, items):
    text = dict(files)
    for item in items:
        lines = text[item["path"]].splitlines(keepends=True)
        true = lines[item["line"] - 1]
        choices = item["choices"]
        assert len(choices) == tasks.N_CHOICES and 0 <= item["gold"] < tasks.N_CHOICES
        assert choices[item["gold"]] == true and true.strip()
        stripped = [c.strip() for c in choices]
        assert len(set(stripped)) == tasks.N_CHOICES and all(stripped)  # distinct, none empty
        in_file = {line.strip() for line in lines}
        distractors = [c for k, c in enumerate(choices) if k != item["gold"]]
        # No distractor is a line of the target's own file (it could be a right answer too).
        assert not {d.strip() for d in distractors} & in_file
        indent = true[: len(true) - len(true.lstrip(" \t"))]
        assert all(c.endswith("\n") and c.startswith(indent) for c in choices)


def test_distractors_are_heldout_code_lines(files, items):
    heldout_lines = {line.strip() for _, text in files for line in text.splitlines()}
    for item in items:
        assert all(c.strip() in heldout_lines for c in item["choices"])


def test_code_lines_skips_comments_docstrings_and_blank_lines():
    text = 'def f(x):\n    """Doc\n    string."""\n    # a comment\n\n    return x  # trailing\n'
    assert tasks.code_lines(text) == [True, False, False, False, False, True]
    assert tasks.code_lines("def f(:\n    (\n") is None  # unreadable: no items from it


def test_build_is_deterministic(files, items, task_dir, tmp_path):
    assert tasks.build_items(list(reversed(files))) == items
    assert tasks.build_items(files, seed=1) != items
    yaml_path = tasks.write_task(tmp_path / "copy")
    shipped = (task_dir / f"{tasks.TASK}.jsonl").read_text(encoding="utf-8")
    assert (tmp_path / "copy" / f"{tasks.TASK}.jsonl").read_text(encoding="utf-8") == shipped
    assert [json.loads(line) for line in shipped.splitlines()] == items
    assert str(tmp_path / "copy" / f"{tasks.TASK}.jsonl") in yaml_path.read_text()
    assert tasks.shipped_task_dir() == task_dir  # built once, then found


def test_simple_baselines_stay_near_chance(files, items):
    """Length, character frequencies and position do not give the answer away (chance is 25%)."""
    def acc(pick) -> float:
        return float(np.mean([pick(item) == item["gold"] for item in items]))

    lengths = [[len(c) for c in item["choices"]] for item in items]
    by_item = {id(item): ls for item, ls in zip(items, lengths)}
    chars = Counter("".join(text for _, text in files))
    total = sum(chars.values())

    def unigram(choice: str) -> float:
        return sum(math.log(chars[c] / total) for c in choice)

    baselines = {
        "longest": acc(lambda it: int(np.argmax(by_item[id(it)]))),
        "shortest": acc(lambda it: int(np.argmin(by_item[id(it)]))),
        "closest to the mean length": acc(lambda it: int(np.argmin(
            [abs(n - np.mean(by_item[id(it)])) for n in by_item[id(it)]]))),
        "character unigram": acc(lambda it: int(np.argmax([unigram(c) for c in it["choices"]]))),
        "character unigram per char": acc(lambda it: int(np.argmax([unigram(c) / len(c) for c in it["choices"]]))),
    }
    baselines.update({f"always choice {k}": acc(lambda it, k=k: k) for k in range(tasks.N_CHOICES)})
    assert all(value <= 0.35 for value in baselines.values()), baselines


def test_lm_eval_builds_the_task_offline(task_dir, items, monkeypatch, tmp_path):
    pytest.importorskip("lm_eval")
    from mixtral_jax.downstream.offline import stay_offline

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    stay_offline()

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access while building the shipped task: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    assert tasks.TASK in manager.all_tasks
    task = manager.load([tasks.TASK])["tasks"][tasks.TASK]
    assert task.OUTPUT_TYPE == "multiple_choice" and set(task._metric_fn_list) == {"acc", "acc_norm"}
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    assert len(task.instances) == tasks.N_CHOICES * len(items)
    by_doc = {}
    for instance in task.instances:
        by_doc.setdefault(instance.doc_id, []).append(instance.args)
    docs = list(task.test_docs())
    for doc_id, args in by_doc.items():
        doc = docs[doc_id]
        # The context is the previous lines; each continuation is one whole choice, no delimiter.
        assert args == [(doc["context"], choice) for choice in doc["choices"]]
        assert task.doc_to_target(doc) == doc["gold"]
