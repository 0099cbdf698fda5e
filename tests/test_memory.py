"""The memory planner against XLA's own accounting of the compiled training step
(`compile().memory_analysis()`: arguments = the donated train state + batch, temp = everything
the step allocates besides), and the `params --mesh --device` command."""

from __future__ import annotations

import json

import pytest

from meshes import mesh_of as _mesh
from mixtral_jax.cli import main
from mixtral_jax.config import ConfigError, load_config
from mixtral_jax.training.aot import compile_train_step
from mixtral_jax.training.memory import GIB, parse_mesh, plan_memory, usable_bytes

SMALL = ["model.vocab_size=512", "model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
         "model.head_dim=32", "model.hidden_dim=384", "model.sliding_window=null", "model.max_seq_len=128",
         "data.seq_len=128", "data.batch_size=16"]
DENSE, MOE = ["model.moe.num_experts=0"], ["model.moe.num_experts=8", "model.moe.dispatch=dropless"]
CASES = [
    (DENSE, "none", {}), (DENSE, "dots_saveable", {}), (MOE, "full", {}),
    (MOE, "full", dict(fsdp=4, expert=2)), (DENSE, "full", dict(fsdp=2, tensor=2, expert=2)),
]


@pytest.mark.parametrize("model,remat,sizes", CASES,
                         ids=[f"{'moe' if m is MOE else 'dense'}-{r}-" + (",".join(f"{k}={v}" for k, v in s.items())
                                                                          or "1dev") for m, r, s in CASES])
def test_plan_is_within_25_percent_of_xla(model, remat, sizes):
    cfg = load_config("configs/quickstart.yaml", [*SMALL, *model, f"model.remat={remat}"])
    xla = compile_train_step(cfg, _mesh(sizes)).memory_analysis()
    plan = plan_memory(cfg, sizes)
    # the donated state is parameters + AdamW moments (+ a few scalars); the batch is small
    state_bytes = xla.argument_size_in_bytes
    assert plan.params + plan.optimizer == pytest.approx(state_bytes, rel=0.02)
    ratio = plan.total / (xla.argument_size_in_bytes + xla.temp_size_in_bytes)
    assert 0.75 <= ratio <= 1.25, f"plan {plan.as_dict()} vs XLA arg {state_bytes} temp {xla.temp_size_in_bytes}"


def test_remat_and_sharding_move_the_estimate_the_right_way():
    cfg = lambda remat: load_config("configs/quickstart.yaml", [*SMALL, *MOE, f"model.remat={remat}"])
    none, dots, full = (plan_memory(cfg(r), {}).activations for r in ("none", "dots_saveable", "full"))
    assert none > dots > full
    one, eight = plan_memory(cfg("full"), {}), plan_memory(cfg("full"), dict(fsdp=4, expert=2))
    assert eight.params * 6 < one.params and eight.local_tokens * 8 == one.local_tokens


def test_params_command_says_whether_mixtral_fits(capsys):
    # Mixtral 8x7B, 4k tokens per device, full remat: over a v5p-256's worth of shards it fits;
    # on 8 H100s with FSDP alone, its 46.7B parameters' weights and Adam state do not.
    assert main(["params", "--config", "mixtral_8x7b", "--mesh", "fsdp=16,expert=8", "--device", "tpu-v5p",
                 "--json", "data.batch_size=128", "data.seq_len=4096", "model.remat=full"]) == 0
    fits = json.loads(capsys.readouterr().out)
    assert fits["total"] == 46_702_792_704 and fits["memory"]["fits"] is True
    # bf16 would halve this; float32 params: 46.7e9 * 4 bytes / (16 fsdp x 8 expert) is the floor
    assert fits["memory"]["params"] >= 46_702_792_704 * 4 / 128
    assert main(["params", "--config", "mixtral_8x7b", "--mesh", "fsdp=8", "--device", "h100",
                 "data.batch_size=8", "data.seq_len=4096", "model.remat=full"]) == 0
    text = capsys.readouterr().out
    assert "does NOT fit h100" in text and "optimizer (AdamW mu, nu)" in text
    total_gib = float(text.split("total")[-1].split("GiB")[0])
    assert total_gib * GIB > usable_bytes("h100")


def test_mesh_and_device_typos_are_one_line_errors(capsys):
    with pytest.raises(ConfigError, match="unknown axis 'epxert'.*did you mean 'expert'"):
        parse_mesh("fsdp=2,epxert=2")
    with pytest.raises(ConfigError, match="fsdp=N with N >= 1"):
        parse_mesh("fsdp=0")
    assert main(["params", "--config", "mistral_7b", "--mesh", "fsdp=2", "--device", "h1000"]) == 2
    assert "unknown device 'h1000'" in capsys.readouterr().err


def test_rows_per_token_of_each_dispatcher():
    from mixtral_jax.training.memory import _moe_rows_per_token

    mesh = dict(data=1, fsdp=1, expert=2, tensor=1)
    cfg = lambda *o: load_config("configs/quickstart.yaml", [*SMALL, *MOE, *o])
    assert _moe_rows_per_token(cfg("model.moe.dispatch=dense"), mesh, 1024) == 8  # every expert, every token
    assert _moe_rows_per_token(cfg("model.moe.router=expert_choice", "model.moe.capacity_factor=2.0"), mesh, 1024) == 2.0
    assert _moe_rows_per_token(cfg(), mesh, 1024) == 2 * 2  # dropless: X * k, the worst-case send buffer
    # capacity 1.0 over 2 expert shards: each shard's 4 experts take at most C = 2 * 2048 / 8 rows
    capped = _moe_rows_per_token(cfg("model.moe.dispatch=capacity", "model.moe.capacity_factor=1.0"), mesh, 1024)
    assert capped == 2 * min(1024 * 2, 4 * 512) / 1024
