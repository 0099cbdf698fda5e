"""Two JAX processes on localhost (4 CPU devices each, gloo collectives) train together and
produce the same losses as one process with 8 devices; each loads only its half of the batch, and
the two processes form a hybrid (multi-slice) mesh with the data axis across them.

Run as a script (`python tests/test_multiprocess.py PROCESS_ID PORT OUT`) it is one worker.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from processes import run_workers

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
OVERRIDES = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=8",
             "model.hidden_dim=64", "data.seq_len=32", "data.batch_size=8", "optim.warmup_steps=1",
             "train.steps=10", "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=1"]


# The workers build a hybrid mesh: each process is one slice (dcn_data=2), fsdp x expert inside it.
# Same device layout as the reference's data=2 x fsdp=2 x expert=2, so the losses must agree.
WORKER_MESH = ["mesh.data=1", "mesh.dcn_data=2"]


def train_losses(extra: list[str] = ()) -> dict:
    """3 steps of the Trainer's sharded init / step on the embedded corpus, this process's rows only."""
    import jax

    from mixtral_jax.config import load_config
    from mixtral_jax.data.pipeline import make_train_iterator
    from mixtral_jax.data.tokenizer import load_or_train_tokenizer
    from mixtral_jax.parallel.mesh import batch_sharding, make_mesh
    from mixtral_jax.training.trainer import global_batch
    from mixtral_jax.training.program import build_program

    cfg = load_config(str(ROOT / "configs/quickstart.yaml"), [*OVERRIDES, *extra])
    tokenizer = load_or_train_tokenizer(cfg.data, cfg.model.vocab_size)
    data = make_train_iterator(cfg.data, tokenizer, seed=cfg.run.seed,
                               shard_index=jax.process_index(), shard_count=jax.process_count())
    mesh = make_mesh(cfg.mesh)
    program = build_program(cfg, mesh)
    train_step = program.train_step
    state = program.init_state()
    losses, local_rows = [], []
    for _ in range(STEPS):
        local = next(data)
        local_rows.append(int(local["inputs"].shape[0]))
        state, metrics = train_step(state, global_batch(local, batch_sharding(mesh)))
        losses.append(float(metrics["loss"]))
    return {"losses": losses, "local_rows": local_rows, "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "processes": jax.process_count()}


def test_two_processes_match_one(tmp_path, corpus_cache):
    reference = train_losses()  # this pytest process: 1 process x 8 devices (conftest)
    assert reference["devices"] == 8 and reference["local_rows"] == [8] * STEPS
    run_workers(__file__, [[str(tmp_path / f"out{i}.json"), *WORKER_MESH] for i in range(2)],
                devices_per_process=4, timeout=400)
    for i in range(2):
        result = json.loads((tmp_path / f"out{i}.json").read_text())
        assert result["processes"] == 2 and result["devices"] == 8 and result["local_devices"] == 4
        assert result["local_rows"] == [4] * STEPS  # each host loaded only its half of the batch
        assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)


if __name__ == "__main__":
    process_id, port, out = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=process_id)
    from mixtral_jax.parallel.mesh import initialize_distributed

    assert initialize_distributed()
    Path(out).write_text(json.dumps(train_losses(sys.argv[4:])))
