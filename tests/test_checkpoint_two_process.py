"""Checkpoint digests in a two-process job: two JAX processes on localhost (one CPU device each,
gloo collectives) train a tiny MoE with its weights sharded across them (fsdp=2), so each
process saves, hashes and later checks only its own shards. Same-size damage to a chunk file
the second process wrote, in the newest step, is found by `mixtral-jax verify` (offline, one
process) and by the two-process rerun, which moves the step aside, resumes from the older good
step and ends with an uninterrupted two-process run's losses.

Run as a script (`python tests/test_checkpoint_two_process.py PROCESS_ID PORT JOBS_JSON`) it is
one worker: it trains each job of the list in turn, in one distributed session.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from processes import run_workers

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=8",
        "model.hidden_dim=64", "model.moe.num_experts=4", "data.seq_len=32", "data.batch_size=8",
        "optim.warmup_steps=2", "optim.schedule=constant", "logging.progress=false", "logging.wandb=off", "model.moe.bias_update_rate=0.01",
        "train.log_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=4", "train.eval_batches=1",
        "train.eval_every=100", "mesh.data=1", "mesh.fsdp=2", "mesh.expert=1", "mesh.tensor=1"]


def _overrides(out_dir: Path, name: str, steps: int) -> list[str]:
    return [f"run.out_dir={out_dir}", f"run.name={name}", f"train.steps={steps}", *TINY]


def _launch(tmp_path: Path, tag: str, jobs: list[list[str]]) -> str:
    """Run the jobs in two worker processes; returns process 0's output (where the run's notes go)."""
    (tmp_path / f"{tag}.json").write_text(json.dumps(jobs))
    # Optimisation level 0 as in conftest; the compile cache lets the rerun skip the compiles.
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    logs = run_workers(__file__, [[str(tmp_path / f"{tag}.json")]] * 2, devices_per_process=1, env=env, tag=tag)
    return logs[0]


def _damage_middle(path: Path) -> None:
    """Invert 64 bytes a quarter into a chunk file: among the values it holds (its tail is the
    per-process tree node the merged manifest supersedes, which no read visits); size unchanged."""
    data = bytearray(path.read_bytes())
    start = len(data) // 4
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])  # differs from every byte there
    path.write_bytes(bytes(data))


def _losses(run_dir: Path) -> dict[int, float]:
    from mixtral_jax.training.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if "loss" in r]
    # one record per logged step: only the primary process writes metrics.jsonl
    assert len({r["step"] for r in records}) == len(records), [r["step"] for r in records]
    return {r["step"]: r["loss"] for r in records}


def test_two_process_checkpoint_damage_is_found_and_the_run_resumes_exactly(tmp_path, corpus_cache, capsys):
    from mixtral_jax import cli
    from mixtral_jax.config import load_config
    from mixtral_jax.data.tokenizer import load_or_train_tokenizer
    from mixtral_jax.training.checkpoint import complete_steps

    reference, damaged = tmp_path / "reference", tmp_path / "damaged"
    cfg = load_config(str(ROOT / "configs/quickstart.yaml"), _overrides(tmp_path, "damaged", 3))
    load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)  # built once here, not raced by the workers
    # One launch: the uninterrupted 4-step run, and 3 steps of the run that will be damaged.
    _launch(tmp_path, "first", [_overrides(tmp_path, "reference", 4), _overrides(tmp_path, "damaged", 3)])
    ckpts = damaged / "checkpoints"
    assert complete_steps(ckpts) == [1, 2, 3]
    record = json.loads((ckpts / "3/digests/process_1.json").read_text())
    assert record["arrays"]["weights"], "process 1 recorded no shards of its own"  # weights sharded over both
    chunk = max((ckpts / "3/weights/ocdbt.process_1/d").iterdir(), key=lambda p: p.stat().st_size)
    size = chunk.stat().st_size
    _damage_middle(chunk)
    assert chunk.stat().st_size == size

    capsys.readouterr()
    assert cli.main(["verify", "--run", str(damaged)]) == 1  # offline, in this one process
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[1].strip() for line in lines[-3:]] == ["ok", "ok", "damaged"], lines
    # Damage zstd still decodes is a digest mismatch; damage it rejects, orbax's read error: either names the
    # array, and the files holding its chunks (a sharded array's are in both processes' files).
    assert re.match(rf"step 3: damaged: (\S+, )?weights/ocdbt\.process_1/d/{chunk.name}(, \S+)* "
                    rf"\((digest mismatch|reading): params\.", lines[-1]), lines

    out = _launch(tmp_path, "rerun", [_overrides(tmp_path, "damaged", 4)])
    warning = next((line for line in out.splitlines() if "checkpoint step 3 is damaged" in line), out[-3000:])
    assert re.search(rf"damaged \((\S+, )?weights/ocdbt\.process_1/d/{chunk.name}(, \S+)*: "
                     rf"(digest mismatch|reading): params\.", warning), warning
    assert "moved it aside to 3.corrupt and resumed from step 2" in warning, warning
    assert f"resumed {damaged} at step 2" in out, out[-3000:]
    assert (ckpts / "3.corrupt").is_dir() and complete_steps(ckpts) == [1, 2, 3, 4]
    assert _losses(damaged) == _losses(reference) and sorted(_losses(reference)) == [1, 2, 3, 4]
    assert cli.main(["verify", "--run", str(damaged)]) == 0  # the redone steps verify


if __name__ == "__main__":
    process_id, port, jobs_file = sys.argv[1:4]
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=process_id)
    from mixtral_jax.parallel.mesh import initialize_distributed

    assert initialize_distributed()
    from mixtral_jax.config import load_config
    from mixtral_jax.training.trainer import Trainer

    for overrides in json.loads(Path(jobs_file).read_text()):
        start = time.perf_counter()
        Trainer(load_config(str(ROOT / "configs/quickstart.yaml"), overrides)).fit()
        print(f"{overrides[1]}: {time.perf_counter() - start:.1f} s", flush=True)  # where a slow run's time went
