"""Sharded training equals single-device training: parameters and optimizer state are built
already sharded by the logical axis rules, batches are split over the data-like axes, and a
checkpoint saved on one mesh restores on another."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from meshes import mesh_of as _mesh
from mixtral_jax.config import ConfigError, MeshConfig, load_config
from mixtral_jax.parallel.mesh import batch_sharding, make_mesh, mesh_shape
from mixtral_jax.parallel.rules import LOGICAL_AXIS_RULES, logical_to_spec
from mixtral_jax.training.trainer import global_batch
from mixtral_jax.training.program import build_program

TINY = ["model.vocab_size=256", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.head_dim=8", "model.hidden_dim=64", "model.sliding_window=null", "model.max_seq_len=64",
        "data.seq_len=16", "data.batch_size=8", "optim.warmup_steps=1", "optim.lr=1e-2", "train.steps=10"]
MODELS = {
    "dense": ["model.moe.num_experts=0"],
    "moe_dropless": ["model.moe.dispatch=dropless"],
    "moe_capacity": ["model.moe.dispatch=capacity", "model.moe.capacity_factor=1.0"],
    "moe_dense": ["model.moe.dispatch=dense"],
    # the later designs: fine-grained and shared (gated) experts, a dense layer first, sigmoid
    # group-limited routing with loss-free balancing, QK-norm and q/k/v bias
    "moe_modern": ["model.n_layers=3", "model.moe.num_experts=8", "model.moe.top_k=3",
                   "model.moe.expert_hidden_dim=16", "model.moe.shared_experts=1", "model.moe.shared_gate=true",
                   "model.moe.first_dense_layers=1", "model.moe.router=sigmoid_topk", "model.moe.n_groups=4",
                   "model.moe.topk_groups=2", "model.moe.renormalize=true", "model.moe.routed_scaling=2.0",
                   "model.moe.bias_update_rate=0.01", "model.moe.bias_recenter=true", "model.qk_norm=head",
                   "model.qkv_bias=true"],
}
MESHES = [dict(data=8), dict(fsdp=4, expert=2), dict(data=2, expert=4), dict(expert=8),
          dict(fsdp=2, tensor=2, expert=2)]
STEPS = 3


def _batches(cfg, n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    out = []
    for _ in range(n):
        tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1), dtype=np.int32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                    "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
                    "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)})
    return out


def _train(cfg, mesh: Mesh, steps: int = STEPS) -> tuple[list[dict], dict]:
    """The Trainer's own sharded init and jitted step on `mesh`, over fixed random batches."""
    program = build_program(cfg, mesh)
    train_step = program.train_step
    state = program.init_state()
    history = []
    for batch in _batches(cfg, steps):
        state, metrics = train_step(state, global_batch(batch, batch_sharding(mesh)))
        history.append(jax.device_get(metrics))
    return history, state


def _cfg(model: str, *extra: str):
    return load_config("configs/quickstart.yaml", [*TINY, *MODELS[model], *extra])


_reference: dict[str, list[dict]] = {}


def _single_device(model: str) -> list[dict]:
    if model not in _reference:
        _reference[model] = _train(_cfg(model), _mesh({}))[0]
    return _reference[model]


def _assert_same(got: list[dict], want: list[dict]) -> None:
    for step, (g, w) in enumerate(zip(got, want)):
        for key in w:
            if key == "grad_norm" or key == "lr":  # lr is exact; grad_norm is compared by the next loss
                continue
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-7, err_msg=f"step {step + 1} {key}")


# Every mesh for the dense model and the MoE with each dispatch path: `dropless` and `capacity`
# run expert-parallel (shard_map + all-to-all), `dense` is plain SPMD over the same layout.
CASES = [(m, s) for m in MODELS if m != "moe_modern" for s in MESHES]
CASES += [("moe_modern", s) for s in (dict(expert=8), dict(fsdp=2, tensor=2, expert=2))]


@pytest.mark.parametrize("model,sizes", CASES,
                         ids=[f"{m}-" + ",".join(f"{k}={v}" for k, v in s.items()) for m, s in CASES])
def test_sharded_steps_match_single_device(model, sizes):
    got, state = _train(_cfg(model), _mesh(sizes))
    want = _single_device(model)
    _assert_same(got, want)
    if model == "moe_capacity":  # capacity factor 1.0 drops slots, so the drop path is compared too
        assert min(float(w["moe/dropped_fraction"]) for w in want) > 0
    assert {"loss", "lm_loss", "aux_loss", "z_loss"} <= set(got[0])
    if model != "dense":
        assert "moe/expert_load" in got[0] and "moe/router_entropy" in got[0]
    # the step keeps the rules' layout (nothing silently gathered onto every device)
    embed = state["params"]["embed"][...]
    assert embed.sharding.is_equivalent_to(
        NamedSharding(embed.sharding.mesh, logical_to_spec(("vocab", "embed"), embed.shape, embed.sharding.mesh)),
        embed.ndim)


def test_params_and_optimizer_state_are_sharded_by_the_rules():
    cfg = _cfg("moe_dropless")
    mesh = _mesh(dict(fsdp=2, tensor=2, expert=2))
    state = build_program(cfg, mesh).init_state()
    w_up = state["params"]["blocks"]["ffn"]["w_up"][...]  # [layers, expert, embed, mlp]
    assert tuple(w_up.sharding.spec) == (None, "expert", "fsdp", "tensor")
    assert w_up.addressable_shards[0].data.shape == (2, 4, 16, 32)  # an 8th of it per device
    assert tuple(state["params"]["blocks"]["attn"]["wq"][...].sharding.spec) == (None, "fsdp", "tensor")
    assert tuple(state["params"]["blocks"]["ffn"]["router"][...].sharding.spec) == (None, "fsdp")
    adam = state["opt_state"][1][0]
    assert tuple(adam.mu["blocks"]["ffn"]["w_up"][...].sharding.spec) == (None, "expert", "fsdp", "tensor")
    assert tuple(adam.nu["embed"][...].sharding.spec) == ("tensor", "fsdp")
    assert state["step"].sharding.is_fully_replicated


def test_rules_fall_back_to_replication():
    mesh = _mesh(dict(fsdp=2, tensor=4))
    table = dict(LOGICAL_AXIS_RULES)
    assert table["expert"] == "expert" and table["embed"] == "fsdp" and table["layers"] is None
    assert logical_to_spec(("embed", "mlp"), (32, 64), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    # 6 heads do not split 4 ways; the expert axis has size 1 here; a mesh axis splits one dim only
    assert logical_to_spec(("embed", "q_heads", "head_dim"), (32, 6, 8), mesh) == jax.sharding.PartitionSpec("fsdp")
    assert logical_to_spec(("expert", "embed"), (8, 32), mesh) == jax.sharding.PartitionSpec(None, "fsdp")
    assert logical_to_spec(("mlp", "q_heads"), (64, 8), mesh) == jax.sharding.PartitionSpec("tensor")


def test_mesh_error_lists_the_devices():
    with pytest.raises(ConfigError, match=r"needs 16 devices but 8 were found \(TFRT_CPU_0|needs 16 .*cpu"):
        mesh_shape(MeshConfig(data=4, fsdp=4, expert=1, tensor=1), 8)
    assert make_mesh(MeshConfig(data=-1, fsdp=1, expert=2, tensor=1)).shape["data"] == 4


def test_checkpoint_saved_on_one_mesh_restores_on_another(tmp_path, corpus_cache):
    """Train 2 steps on (fsdp=4, expert=2), stop; resume on (data=2, tensor=2, expert=2):
    the resumed steps equal an uninterrupted run's."""
    from mixtral_jax.training.metrics import read_metrics
    from mixtral_jax.training.trainer import Trainer

    tiny = [o for o in TINY if not o.startswith("model.vocab_size")]  # the session's cached tokenizer
    common = [f"run.out_dir={tmp_path}", *tiny, "data.seq_len=32", "train.steps=4", "train.log_every=1",
              "train.eval_every=4", "train.checkpoint_every=2", "train.eval_batches=1", "logging.progress=false",
              "logging.wandb=off"]
    fsdp = ["mesh.data=1", "mesh.fsdp=4", "mesh.expert=2", "mesh.tensor=1"]
    other = ["mesh.data=2", "mesh.fsdp=1", "mesh.expert=2", "mesh.tensor=2"]
    straight = load_config("configs/quickstart.yaml", [*common, "run.name=straight", *fsdp])
    Trainer(straight).fit()
    Trainer(load_config("configs/quickstart.yaml", [*common, "run.name=moved", *fsdp])).fit(stop_at=2)
    moved = load_config("configs/quickstart.yaml", [*common, "run.name=moved", *other])
    trainer = Trainer(moved)
    assert tuple(trainer.state_shardings["params"]["blocks"]["ffn"]["w_up"].get_value().spec) == \
        (None, "expert", None, "tensor")
    trainer.fit()
    a = {r["step"]: r["loss"] for r in read_metrics(straight.run_dir) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(moved.run_dir) if "loss" in r}
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


class _FakeTpu:
    """Stands in for a TPU device of a multi-slice job: only what the hybrid mesh builder reads."""

    platform = device_kind = "cpu"

    def __init__(self, i: int, per_slice: int):
        self.id, self.slice_index, self.process_index = i, i // per_slice, i // 4

    def __repr__(self) -> str:
        return f"dev{self.id}/slice{self.slice_index}"


def test_multi_slice_mesh_keeps_slices_on_the_dcn_axis():
    # 2 slices x 8 chips: data crosses slices (dcn_data=2), fsdp=4 x tensor=2 stay inside one.
    devices = [_FakeTpu(i, 8) for i in range(16)]
    from mixtral_jax.parallel.mesh import device_grid

    cfg = MeshConfig(data=1, fsdp=4, expert=1, tensor=2, dcn_data=2)
    grid = device_grid(cfg, devices)
    assert grid.shape == (2, 4, 1, 2)
    for d in range(2):  # each data index is exactly one slice
        assert {dev.slice_index for dev in grid[d].ravel()} == {d}
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, expert=1, tensor=1, dcn_data=2), 16)["data"] == 8
    with pytest.raises(ConfigError, match="ask for 8 slices but the devices span 2 slice\\(s\\) and 4 process"):
        device_grid(MeshConfig(data=1, fsdp=2, expert=1, tensor=1, dcn_data=8), devices)
    with pytest.raises(ConfigError, match="do not split into 3 equal slices"):
        mesh_shape(MeshConfig(data=-1, fsdp=1, expert=1, tensor=1, dcn_data=3), 16)


def test_two_processes_as_slices_on_cpu():
    """Without slice_index (GPU nodes, CPU), each process is a slice: here one process owns all
    8 devices, so dcn_data=2 is refused with the reason, and dcn 1 is the plain mesh."""
    with pytest.raises(ConfigError, match="ask for 2 slices but the devices span 1 slice\\(s\\) and 1 process"):
        make_mesh(MeshConfig(data=4, fsdp=1, expert=1, tensor=1, dcn_data=2))
    assert make_mesh(MeshConfig(data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1)).shape["data"] == 8
