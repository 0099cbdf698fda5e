"""Hosts read disjoint data: two JAX processes (gloo, localhost) each build the train iterator
for their own process_index, as the Trainer does. Over one epoch the documents the two read are
disjoint and together exactly the training split, from a token cache and from a JSONL source;
with a mixture, their rows together are exactly the batches one process reads alone, and the
iterator state a checkpoint stores (every process's, gathered) resumes each process exactly.

Run as a script (`python tests/test_data_hosts.py PROCESS_ID PORT OUT ARGS_JSON`) it is one worker.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from pathlib import Path

from processes import run_workers

ROOT = Path(__file__).resolve().parent.parent
BATCH = 4  # global rows: 2 per process
SEQ = 64
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def _cfg(source_overrides: list[str]):
    from mixtral_jax.config import load_config

    return load_config(str(ROOT / "configs/quickstart.yaml"), [
        "model.vocab_size=300", f"data.seq_len={SEQ}", f"data.batch_size={BATCH}", "data.pack=false",
        *source_overrides])


def read_rows(args: dict, shard_index: int, shard_count: int) -> dict:
    """Per case: this process's rows of the first `batches` batches, as (global position, text)."""
    from mixtral_jax.data.pipeline import make_train_iterator
    from mixtral_jax.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(args["tokenizer"])
    out = {}
    for case, overrides in args["cases"].items():
        cfg = _cfg(overrides)
        it = make_train_iterator(cfg.data, tok, seed=5, shard_index=shard_index, shard_count=shard_count)
        local = BATCH // shard_count
        rows = []
        for b in range(args["batches"]):
            batch = next(it)
            for i in range(local):
                text = tok.decode(batch["inputs"][i][batch["segment_ids"][i] > 0][1:])  # drop BOS
                rows.append([b * BATCH + shard_index * local + i, text])
        out[case] = rows
    return out


def _documents(root: Path) -> None:
    rng = random.Random(7)
    with open(root / "docs.jsonl", "w") as f:
        for i in range(120):  # short: one document per row (pack=false), so rows name documents
            f.write(json.dumps({"text": f"doc{i} " + " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))}) + "\n")
    with open(root / "more.jsonl", "w") as f:
        for i in range(80):
            f.write(json.dumps({"text": f"more{i} " + " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))}) + "\n")


def test_two_hosts_read_disjoint_halves(tmp_path, corpus_cache):
    from mixtral_jax.data.sources import load_documents
    from mixtral_jax.data.tokenize import build_cache
    from mixtral_jax.data.tokenizer import load_or_train_tokenizer

    _documents(tmp_path)
    jsonl = [f"data.source=jsonl:{tmp_path}/docs.jsonl"]
    tok = load_or_train_tokenizer(_cfg(jsonl).data, 300)
    build_cache(_cfg(jsonl).data, tok, tmp_path / "cache", say=lambda _: None)
    train = [d.split()[0] for d in load_documents(_cfg(jsonl).data, "train")]
    assert max(len(tok.encode(f"{d}")) for d in load_documents(_cfg(jsonl).data, "train")) < SEQ - 2
    mixture = [f"data.mixture=[{{name: cached, source: 'tokens:{tmp_path}/cache', weight: 1}},"
               f" {{name: more, source: 'jsonl:{tmp_path}/more.jsonl', weight: 1}}]",
               f"data.tokenizer.path={tmp_path}/cache/tokenizer.model"]
    args = {"tokenizer": str(tmp_path / "cache" / "tokenizer.model"), "batches": -(-len(train) // BATCH),
            "cases": {"cache": [f"data.source=tokens:{tmp_path}/cache"], "jsonl": jsonl, "mixture": mixture}}
    (tmp_path / "args.json").write_text(json.dumps(args))

    run_workers(__file__, [[str(tmp_path / f"out{i}.json"), str(tmp_path / "args.json")] for i in range(2)],
                devices_per_process=1)
    hosts = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    alone = read_rows(args, 0, 1)  # one process reading every row
    for case in ("cache", "jsonl"):
        epoch = [[re.match(r"\S+", text).group(0) for pos, text in host[case] if pos < len(train)] for host in hosts]
        assert not set(epoch[0]) & set(epoch[1])  # no document read by both
        assert sorted(epoch[0] + epoch[1]) == sorted(train)  # together: the whole split, once
    for case in ("cache", "jsonl", "mixture"):
        together = sorted(hosts[0][case] + hosts[1][case])
        assert together == sorted(alone[case])  # the two hosts' rows are exactly one process's
    assert {re.match(r"[a-z]+", t).group(0) for _, t in alone["mixture"]} == {"doc", "more"}
    assert all(host["resume"] == {"states": 2, "same": True} for host in hosts)

if __name__ == "__main__":
    process_id, port, out, args_file = sys.argv[1:5]
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=process_id)
    from mixtral_jax.parallel.mesh import initialize_distributed

    assert initialize_distributed()
    import jax

    assert jax.process_count() == 2
    args = json.loads(Path(args_file).read_text())
    result = read_rows(args, jax.process_index(), jax.process_count())
    # A checkpoint holds every process's state (the primary writes it); each resumes from its own.
    from mixtral_jax.data.hosts import gather_states, local_state
    from mixtral_jax.data.pipeline import make_train_iterator
    from mixtral_jax.data.tokenizer import Tokenizer

    tok, cfg = Tokenizer.from_file(args["tokenizer"]), _cfg(args["cases"]["mixture"])
    it = make_train_iterator(cfg.data, tok, seed=5, shard_index=jax.process_index(), shard_count=2)
    for _ in range(3):
        next(it)
    saved = json.loads(json.dumps(gather_states(it.get_state())))
    resumed = make_train_iterator(cfg.data, tok, seed=5, shard_index=jax.process_index(), shard_count=2)
    resumed.set_state(local_state(saved))
    result["resume"] = {"states": len(saved["processes"]),
                        "same": all(bool((next(it)["inputs"] == next(resumed)["inputs"]).all()) for _ in range(4))}
    Path(out).write_text(json.dumps(result))
