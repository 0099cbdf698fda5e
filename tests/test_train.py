"""End-to-end training on the embedded corpus: learning, resume exactness, eval and params CLI."""

import json
import math
import subprocess
import sys

import pytest

from mixtral_jax.config import load_config
from mixtral_jax.training.metrics import read_metrics
from mixtral_jax.training.trainer import Trainer

# A small, fast MoE on the embedded corpus (tokenizer and corpus cached per test session).
SMALL = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
    "model.hidden_dim=128", "model.sliding_window=32", "data.seq_len=64", "data.batch_size=8",
    "optim.warmup_steps=5", "optim.lr=3e-3", "logging.progress=false", "logging.wandb=off",
]


def _cfg(out_dir, name, *extra):
    return load_config("configs/quickstart.yaml", [f"run.out_dir={out_dir}", f"run.name={name}", *SMALL, *extra])


def test_short_run_lowers_heldout_loss(tmp_path, corpus_cache):
    cfg = _cfg(tmp_path, "learn", "train.steps=60", "train.eval_every=20", "train.log_every=10",
               "train.checkpoint_every=60", "train.eval_batches=4")
    summary = Trainer(cfg).fit()
    evals = [r["eval_loss"] for r in read_metrics(cfg.run_dir) if "eval_loss" in r]
    assert len(evals) == 3
    assert evals[-1] < evals[0] - 0.3, evals
    assert evals[-1] < math.log(cfg.model.vocab_size) - 1.5
    records = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    for key in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens_seen", "step_time_s",
                "tokens_per_s", "model_tflops_per_s", "mfu", "device_hours", "cost_usd", "projected_device_hours",
                "data_wait_s",
                "projected_cost_usd", "moe/load_max_over_mean", "moe/load_cv", "moe/dropped_fraction",
                "moe/router_entropy", "moe/expert_load"):
        assert key in records[-1], key
    # The input pipeline keeps up: fetching a batch takes a small part of a step.
    assert 0 <= records[-1]["data_wait_s"] < 0.5 * records[-1]["step_time_s"]
    load = records[-1]["moe/expert_load"]
    assert len(load) == 2 and len(load[0]) == 8 and abs(sum(load[0]) - 1.0) < 1e-5
    assert summary["steps"] == 60 and summary["eval_loss"] == pytest.approx(evals[-1])
    assert summary["tokens"] == 60 * 8 * 64 and summary["peak_source"] == "measured"
    assert summary["model_flops"] == pytest.approx(summary["tokens"] * summary["train_flops_per_token"])
    assert 0 < summary["mean_mfu"] < 1 and summary["device_hours"] > 0
    last = records[-1]
    assert last["mfu"] == pytest.approx(last["model_tflops_per_s"] / summary["peak_tflops"])
    assert (cfg.run_dir / "config.yaml").is_file() and (cfg.run_dir / "tokenizer.model").is_file()
    assert json.loads((cfg.run_dir / "summary.json").read_text())["unigram_entropy"] > 0


@pytest.mark.parametrize("variant", [
    [],
    ["optim.grad_accum=2", "data.batch_size=16"],
    # RNG (router jitter) and the loss-free balancing bias must be checkpointed too
    ["model.moe.jitter=0.1", "model.moe.bias_update_rate=0.01", "model.moe.aux_loss_coef=0"],
], ids=["plain", "grad_accum", "jitter_and_bias"])
def test_stop_and_resume_matches_uninterrupted(tmp_path, corpus_cache, variant):
    common = ["train.steps=8", "train.log_every=1", "train.eval_every=8", "train.checkpoint_every=4",
              "train.eval_batches=2", *variant]
    straight = _cfg(tmp_path, "straight", *common)
    Trainer(straight).fit()
    resumed = _cfg(tmp_path, "resumed", *common)
    Trainer(resumed).fit(stop_at=4)  # as if the job were preempted right after step 4's checkpoint
    assert max(r["step"] for r in read_metrics(resumed.run_dir)) == 4
    Trainer(resumed).fit()
    a = {r["step"]: r for r in read_metrics(straight.run_dir) if "loss" in r}
    b = {r["step"]: r for r in read_metrics(resumed.run_dir) if "loss" in r}
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert a[step]["loss"] == b[step]["loss"], (step, a[step]["loss"], b[step]["loss"])
    assert a[8]["eval_loss"] == b[8]["eval_loss"]
    # the device-hour clock is checkpointed: the resumed run continues the total, not from zero
    assert b[5]["device_hours"] > b[4]["device_hours"] > 0
    assert b[8]["cost_usd"] == pytest.approx(b[8]["device_hours"] * resumed.cost.price_per_device_hour)


def test_eval_and_params_cli(tmp_path, corpus_cache):
    cfg = _cfg(tmp_path, "cli", "train.steps=4", "train.checkpoint_every=4", "train.eval_every=4",
               "train.eval_batches=2", "train.log_every=2")
    summary = Trainer(cfg).fit()
    out = subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "eval", "--run", str(cfg.run_dir)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["step"] == 4
    assert result["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    out = subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "params", "--config", "mixtral_8x7b", "--json"],
                         capture_output=True, text=True, check=True)
    counts = json.loads(out.stdout)
    assert counts["total"] == 46_702_792_704 and counts["active"] == 12_879_925_248


def test_loss_free_bias_is_updated_by_the_train_step(tmp_path, corpus_cache):
    """The selection bias moves by exactly +-rate per step toward balance, from the step's load."""
    import jax
    from flax import nnx

    from mixtral_jax.models.routing import RouterBias
    from mixtral_jax.training.evaluate import load_run_model

    rate = 0.01
    cfg = _cfg(tmp_path, "bias", "train.steps=3", "train.log_every=1", "train.checkpoint_every=3",
               "train.eval_every=3", "train.eval_batches=1", f"model.moe.bias_update_rate={rate}",
               "model.moe.aux_loss_coef=0")
    Trainer(cfg).fit()
    model, _, step = load_run_model(cfg.run_dir)
    bias = jax.tree.leaves(nnx.state(model, RouterBias))[0]
    assert step == 3 and bias.shape == (2, 8)
    # each entry is a sum of three +-rate (or 0) moves
    steps_taken = jax.numpy.abs(bias) / rate
    assert float(jax.numpy.max(jax.numpy.abs(steps_taken - jax.numpy.round(steps_taken)))) < 1e-4
    assert float(jax.numpy.max(jax.numpy.abs(bias))) > 0
    # the sign of the last move follows the last logged load: overloaded experts go down
    load = [r for r in read_metrics(cfg.run_dir) if "loss" in r][-1]["moe/expert_load"]
    assert len(load) == 2
