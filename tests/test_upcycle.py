"""`mixtral-jax upcycle` (sparse upcycling) and `eval --json`: an MoE run whose experts are copies
of a trained dense run's FFN computes the dense model's function, holds exactly the copied
weights where the layer plan says, trains on with `train.init_from`, and refuses what it cannot
copy with one line. References: the dense run itself (its eval loss, logits and weights) and a
fresh MoE init (the router)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx

from mixtral_jax.cli import main
from mixtral_jax.config import load_config
from mixtral_jax.models.layer_plan import stack_index
from mixtral_jax.training.evaluate import load_run_model

# A tiny dense trunk of 3 layers (so a layer pattern leaves sparse and dense layers mixed).
DENSE = [
    "model.dim=64", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
    "model.hidden_dim=128", "model.sliding_window=32", "model.moe.num_experts=0", "data.seq_len=64",
    "data.batch_size=8", "optim.warmup_steps=0", "optim.lr=1e-2", "logging.progress=false", "logging.wandb=off",
    "train.steps=6", "train.eval_every=6", "train.eval_batches=2", "train.checkpoint_every=6", "train.log_every=3",
]
MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.router=topk_softmax"]
FFN = ("w_gate", "w_up", "w_down")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_cache):
    from mixtral_jax.training.trainer import Trainer

    root = tmp_path_factory.mktemp("upcycle")
    dense = load_config("configs/quickstart.yaml", [f"run.out_dir={root}", "run.name=dense", *DENSE])
    Trainer(dense).fit()
    return root, dense.run_dir


@pytest.fixture(scope="module")
def upcycled(runs):
    root, dense = runs
    out = root / "moe"
    assert main(["upcycle", "--run", str(dense), "--out", str(out), *MOE]) == 0
    return out


def _eval_json(run, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object, nothing else
    return json.loads(out)


def _flat(model) -> dict[tuple, np.ndarray]:
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _tokens(cfg) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(0).integers(3, cfg.model.vocab_size, size=(2, 48)), jnp.int32)


def _check_copied(dense: dict, moe: dict, sparse: tuple[bool, ...], experts: int) -> None:
    """Every MoE weight is the dense weight of the global layer the layer plan puts there."""
    for top in (("embed",), ("lm_head",), ("final_norm", "weight")):
        assert np.array_equal(moe[top], dense[top]), top
    for i, (is_sparse, j) in enumerate(stack_index(sparse)):
        stack = "blocks" if is_sparse else "dense_blocks"
        for path, weight in dense.items():
            if path[0] != "blocks":
                continue
            got = moe[(stack, *path[1:])][j]
            if is_sparse and path[1] == "ffn":
                assert got.shape == (experts, *weight[i].shape)
                for e in range(experts):
                    assert np.array_equal(got[e], weight[i]), (i, e, path)
            else:
                assert np.array_equal(got, weight[i]), (i, path)


def test_upcycled_run_evaluates_as_the_dense_run(runs, upcycled, capsys):
    _, dense = runs
    want, got = _eval_json(dense, capsys), _eval_json(upcycled, capsys)
    for result in want, got:
        assert {"eval_loss", "eval_ppl", "tokens", "step"} <= result.keys()
        assert math.isclose(result["eval_ppl"], math.exp(result["eval_loss"]), rel_tol=1e-9)
    assert got["step"] == 0 and got["tokens"] == want["tokens"] > 0
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5)


def test_weights_are_copied_and_the_router_is_a_fresh_init(runs, upcycled):
    from mixtral_jax.parallel.mesh import make_mesh
    from mixtral_jax.training.program import build_program

    _, dense_dir = runs
    dense, dense_cfg, _ = load_run_model(dense_dir)
    moe, cfg, step = load_run_model(upcycled)
    assert step == 0 and cfg.model.moe.num_experts == 4 and cfg.model.moe.top_k == 2
    assert cfg.run_dir == upcycled and cfg.train.init_from is None
    assert cfg.model.dim == dense_cfg.model.dim and cfg.model.n_layers == dense_cfg.model.n_layers
    assert (upcycled / "tokenizer.model").read_bytes() == (dense_dir / "tokenizer.model").read_bytes()
    got = _flat(moe)
    _check_copied(_flat(dense), got, cfg.model.sparse_layers, 4)
    # The router is bit for bit the one a fresh MoE run with this config and seed starts from.
    fresh = build_program(cfg, make_mesh(cfg.mesh)).init_state()["params"]
    fresh = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(fresh)}
    assert got.keys() == fresh.keys()
    assert np.array_equal(got[("blocks", "ffn", "router")], fresh[("blocks", "ffn", "router")])


@pytest.mark.parametrize("pattern", [
    ["model.moe.first_dense_layers=1"],
    ["model.moe.dense_layers=[1]", "model.moe.router=sigmoid_topk", "model.moe.renormalize=true",
     "model.moe.top_k=3", "model.moe.bias_update_rate=0.01"],
], ids=["first_dense_layers", "dense_layers_sigmoid_renormalized"])
def test_layer_patterns_stay_exact(runs, pattern):
    root, dense_dir = runs
    out = root / ("pattern_" + pattern[0].split("=")[0].rsplit(".", 1)[1])
    assert main(["upcycle", "--run", str(dense_dir), "--out", str(out), *MOE, *pattern]) == 0
    dense, _, _ = load_run_model(dense_dir)
    moe, cfg, _ = load_run_model(out)
    sparse = cfg.model.sparse_layers
    assert not all(sparse) and any(sparse)
    _check_copied(_flat(dense), _flat(moe), sparse, 4)
    tokens = _tokens(cfg)
    want, got = np.asarray(dense(tokens).logits), np.asarray(moe(tokens).logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_noise_makes_experts_differ_by_the_relative_std(runs, capsys):
    root, dense_dir = runs
    out, noise = root / "noisy", 0.1
    assert main(["upcycle", "--run", str(dense_dir), "--out", str(out), "--noise", str(noise), *MOE]) == 0
    dense, _, _ = load_run_model(dense_dir)
    moe, cfg, _ = load_run_model(out)
    d, m = _flat(dense), _flat(moe)
    for name in FFN:
        base, experts = d[("blocks", "ffn", name)], m[("blocks", "ffn", name)]
        for layer in range(cfg.model.n_layers):
            delta = experts[layer] - base[layer][None]
            assert np.std(delta) / np.std(base[layer]) == pytest.approx(noise, rel=0.1), (name, layer)
            assert not np.array_equal(experts[layer, 0], experts[layer, 1])
    assert np.array_equal(m[("blocks", "attn", "wq")], d[("blocks", "attn", "wq")])
    # The logit comparison of the exact cases can see a perturbation of this size.
    tokens = _tokens(cfg)
    assert np.abs(np.asarray(moe(tokens).logits) - np.asarray(dense(tokens).logits)).max() > 1e-3
    # A router whose weights do not sum to 1 is upcycled, with a note that it is not exact.
    capsys.readouterr()
    assert main(["upcycle", "--run", str(dense_dir), "--out", str(root / "inexact"), *MOE,
                 "model.moe.router=softmax_topk"]) == 0
    assert "do not sum to 1" in capsys.readouterr().err


def test_train_init_from_continues_the_upcycled_run(runs, upcycled):
    from mixtral_jax.training.metrics import read_metrics
    from mixtral_jax.training.trainer import Trainer

    root, _ = runs
    cfg = load_config(upcycled / "config.yaml", [
        f"run.out_dir={root}", "run.name=continued", f"train.init_from={upcycled}", "train.steps=3",
        "train.log_every=1", "train.eval_every=3", "train.eval_batches=1", "train.checkpoint_every=3"])
    summary = Trainer(cfg).fit()
    records = [r for r in read_metrics(cfg.run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records) and math.isfinite(summary["eval_loss"])
    assert len(records[-1]["moe/expert_load"]) == cfg.model.n_layers


@pytest.mark.parametrize("source, out, args, message", [
    ("dense", "new", [*MOE, "model.moe.expert_hidden_dim=64"], "model.moe.expert_hidden_dim"),
    ("dense", "new", [*MOE, "model.dim=32"], "model.dim"),
    ("dense", "new", [*MOE, "model.n_layers=4"], "model.n_layers"),
    ("dense", "new", [*MOE, "model.moe.shared_experts=1"], "model.moe.shared_experts"),
    ("dense", "new", [], "model.moe.num_experts"),
    ("dense", "new", [*MOE, "run.name=x"], "run.name"),
    ("dense", "new", [*MOE, "--noise", "-0.5"], "--noise"),
    ("moe", "new", MOE, "already an MoE run"),
    ("dense", "moe", MOE, "already has checkpoints"),
], ids=["expert_width", "dim", "layers", "shared_experts", "no_experts", "run_name", "negative_noise",
        "already_moe", "out_has_checkpoints"])
def test_refusals_are_one_line(runs, upcycled, capsys, source, out, args, message):
    root, dense = runs
    dirs = {"dense": dense, "moe": upcycled, "new": root / "refused"}
    capsys.readouterr()
    assert main(["upcycle", "--run", str(dirs[source]), "--out", str(dirs[out]), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("mixtral-jax upcycle: error: "), err
    assert not dirs["new"].exists()


def test_eval_json_stdout_is_exactly_one_object(upcycled):
    out = subprocess.run([sys.executable, "-m", "mixtral_jax.cli", "eval", "--run", str(upcycled), "--json"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert out.stdout.strip().count("\n") == 0
    assert {"eval_loss", "eval_ppl", "tokens"} <= result.keys()
    assert result["tokens"] > 0 and math.isfinite(result["eval_loss"])


def test_granular_mode_cuts_the_dense_ffn_into_scaled_slices(runs):
    """Granular upcycling (fine-grained experts of width hidden/G): expert e holds slice e mod G
    of the dense FFN's hidden units with w_down times G, checked against a loop over experts;
    one expert per slice with equal weights 1/G sums to the dense FFN output (numpy SwiGLU)."""
    from mixtral_jax.interop.upcycle import upcycle

    root, dense_dir = runs
    out = upcycle(dense_dir, root / "granular", [*MOE, "model.moe.expert_hidden_dim=64"], granular=True, step=6)
    dense, dense_cfg, _ = load_run_model(dense_dir)
    moe, cfg, step = load_run_model(out)
    assert step == 0 and cfg.model.expert_width == 64
    width, slices = 64, dense_cfg.model.hidden_dim // 64  # G = 128 / 64 = 2
    d, m = _flat(dense), _flat(moe)
    for layer in range(cfg.model.n_layers):
        gate, up, down = (d[("blocks", "ffn", w)][layer] for w in FFN)
        for e in range(4):
            s = slice((e % slices) * width, (e % slices + 1) * width)
            np.testing.assert_array_equal(m[("blocks", "ffn", "w_gate")][layer, e], gate[:, s])
            np.testing.assert_array_equal(m[("blocks", "ffn", "w_up")][layer, e], up[:, s])
            np.testing.assert_allclose(m[("blocks", "ffn", "w_down")][layer, e], slices * down[s], rtol=1e-6)
        x = np.random.default_rng(layer).standard_normal((5, cfg.model.dim)).astype(np.float32)
        silu = lambda z: z / (1.0 + np.exp(-z))
        ffn = lambda g, u, w: (silu(x @ g) * (x @ u)) @ w
        want = ffn(gate, up, down)
        experts = [tuple(m[("blocks", "ffn", w)][layer, e] for w in FFN) for e in (2, 1)]  # slices 0 and 1
        got = sum(ffn(*weights) / slices for weights in experts)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # the other attention / embedding weights are the dense run's
    assert np.array_equal(m[("embed",)], d[("embed",)])
