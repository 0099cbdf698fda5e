"""Fine-tuning options: frozen parameter groups, the router's learning-rate scale, LoRA
adapters (trained alone, merged for eval / export), checked on the real jitted train step."""

import numpy as np
import pytest

import jax
from meshes import mesh_of
from mixtral_jax.config import ConfigError, load_config
from mixtral_jax.models.params import path_name
from mixtral_jax.parallel.mesh import batch_sharding
from mixtral_jax.training import lora
from mixtral_jax.training.trainer import global_batch
from mixtral_jax.training.program import build_program

TINY = [
    "model.vocab_size=128", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.head_dim=8", "model.hidden_dim=48", "model.moe.num_experts=4", "model.moe.top_k=2",
    "data.seq_len=16", "data.batch_size=8", "optim.warmup_steps=0", "optim.lr=1e-2", "train.steps=100",
    "logging.progress=false",
]


def _setup(*extra):
    cfg = load_config("configs/quickstart.yaml", [*TINY, *extra])
    mesh = mesh_of({"data": 1})  # one device: exact update ratios, quick compiles
    return cfg, mesh, build_program(cfg, mesh)


def _batch(cfg, mesh, seed=0):
    rng = np.random.default_rng(seed)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tokens = rng.integers(3, cfg.model.vocab_size, size=(b, t + 1)).astype(np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)}
    return global_batch(local, batch_sharding(mesh))


def _flat(tree) -> dict[str, np.ndarray]:
    return {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _train(program, batch, steps):
    state = program.init_state()
    before = _flat(state["params"])
    losses = []
    for _ in range(steps):
        state, metrics = program.train_step(state, batch)
        losses.append(float(metrics["lm_loss"]))
    return before, state, losses


def _changed(before, after) -> set[str]:
    return {name for name in before if not np.array_equal(before[name], after[name])}


def test_freeze_router_keeps_router_bit_identical():
    cfg, mesh, program = _setup("finetune.freeze=router")
    before, state, _ = _train(program, _batch(cfg, mesh), 2)
    changed = _changed(before, _flat(state["params"]))
    assert changed == set(before) - {"blocks.ffn.router"}


def test_freeze_all_but_experts_trains_experts_only_and_keeps_no_moments_for_the_rest():
    cfg, mesh, program = _setup("finetune.freeze=all_but_experts")
    before, state, _ = _train(program, _batch(cfg, mesh), 2)
    experts = {"blocks.ffn.w_gate", "blocks.ffn.w_up", "blocks.ffn.w_down"}
    assert _changed(before, _flat(state["params"])) == experts
    expert_size = sum(before[name].size for name in experts)
    moment_size = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    assert moment_size == 2 * expert_size  # AdamW's mu and nu for the experts, nothing for frozen weights


def test_router_lr_scale_scales_exactly_the_router_update():
    """AdamW's update is linear in the learning rate (weight decay included), so one step from
    the same init with router_lr_scale=0.25 moves the router by exactly 0.25x, the rest alike."""
    cfg, mesh, full = _setup()
    batch = _batch(cfg, mesh)
    before, state_full, _ = _train(full, batch, 1)
    _, _, scaled = _setup("finetune.router_lr_scale=0.25")
    _, state_scaled, _ = _train(scaled, batch, 1)
    after_full, after_scaled = _flat(state_full["params"]), _flat(state_scaled["params"])
    for name in before:
        d_full, d_scaled = after_full[name] - before[name], after_scaled[name] - before[name]
        factor = 0.25 if name == "blocks.ffn.router" else 1.0
        np.testing.assert_allclose(d_scaled, factor * d_full, rtol=2e-4, atol=1e-7, err_msg=name)
        assert np.abs(d_full).max() > 0, name


def test_lora_trains_adapters_only_and_starts_at_the_base_model():
    cfg, mesh, program = _setup("finetune.lora.rank=4", "finetune.lora.alpha=8")
    batch = _batch(cfg, mesh)
    before, state, losses = _train(program, batch, 15)
    assert not _changed(before, _flat(state["params"]))  # base weights untouched
    _, _, base = _setup()
    _, _, base_losses = _train(base, batch, 1)
    assert losses[0] == pytest.approx(base_losses[0], abs=1e-6)  # B = 0: the merged model is the base
    assert losses[-1] < losses[0] - 0.15  # adapters alone fit the fixed batch (measured drop at 25 steps: 0.41)
    adapters = _flat(state["adapters"])
    assert set(name.rsplit(".", 1)[0] for name in adapters) == {
        "blocks.attn.wq", "blocks.attn.wk", "blocks.attn.wv", "blocks.attn.wo",
        "blocks.ffn.w_gate", "blocks.ffn.w_up", "blocks.ffn.w_down"}
    # Merging, against a plain numpy reference for two layouts: wq [L, dim, H, Dh] reads as
    # [L, dim, H*Dh]; expert w_down [L, E, hidden, dim] as one matrix per (layer, expert).
    merged = _flat(lora.merge(state["params"], state["adapters"], cfg.finetune.lora))
    scale = 8 / 4
    a, b = adapters["blocks.attn.wq.a"], adapters["blocks.attn.wq.b"]
    wq = before["blocks.attn.wq"]
    ref = wq + scale * np.stack([a[i] @ b[i] for i in range(2)]).reshape(wq.shape)
    np.testing.assert_allclose(merged["blocks.attn.wq"], ref, rtol=1e-5, atol=1e-6)
    a, b = adapters["blocks.ffn.w_down.a"], adapters["blocks.ffn.w_down.b"]
    w = before["blocks.ffn.w_down"]
    ref = w + scale * np.einsum("leir,lero->leio", a, b)
    np.testing.assert_allclose(merged["blocks.ffn.w_down"], ref, rtol=1e-5, atol=1e-6)
    assert np.abs(merged["blocks.ffn.w_down"] - w).max() > 0
    np.testing.assert_array_equal(merged["blocks.ffn.router"], before["blocks.ffn.router"])


def test_lora_targets_select_weights():
    cfg, mesh, program = _setup("finetune.lora.rank=2", "finetune.lora.targets=[experts]")
    state = program.init_state()
    assert {name.rsplit(".", 1)[0] for name in _flat(state["adapters"])} == {
        "blocks.ffn.w_gate", "blocks.ffn.w_up", "blocks.ffn.w_down"}


@pytest.mark.parametrize("overrides, message", [
    (["finetune.freeze=rooter"], "did you mean 'router'"),
    (["finetune.freeze=all_but_experts", "model.moe.num_experts=0"], "needs an MoE model"),
    (["finetune.lora.rank=4", "finetune.freeze=router"], "LoRA already freezes"),
    (["finetune.lora.rank=4", "finetune.lora.targets=[atention]"], "did you mean 'attention'"),
    (["finetune.lora.rank=4", "finetune.lora.targets=[experts]", "model.moe.num_experts=0"], "selects no weight"),
    (["finetune.router_lr_scale=-1"], "finetune.router_lr_scale"),
    (["finetune.lora.rank=-2"], "finetune.lora.rank"),
    (["finetune.lora.rnk=2"], "did you mean 'finetune.lora.rank'"),
])
def test_finetune_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/quickstart.yaml", [*TINY, *overrides])


# ---------------------------------------------------------------- instruction fine-tuning, end to end

SMALL = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
    "model.hidden_dim=128", "model.sliding_window=32", "data.seq_len=64", "data.batch_size=8",
    "optim.warmup_steps=5", "optim.lr=3e-3", "logging.progress=false", "logging.wandb=off", "train.eval_batches=1",
]
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Peru": "Lima", "Kenya": "Nairobi", "Chile": "Santiago",
            "Egypt": "Cairo", "Norway": "Oslo", "Cuba": "Havana", "Italy": "Rome", "Spain": "Madrid"}


def _instruct_jsonl(path):
    import json
    import random

    rng = random.Random(0)
    lines = []
    for i in range(300):
        country = rng.choice(sorted(CAPITALS))
        prompt = f"Request {i}: name the capital of {country}."
        response = f"The capital of {country} is {CAPITALS[country]}."
        record = ({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}
                  if i % 5 == 0 else {"prompt": prompt, "response": response})
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_instruction_finetune_lowers_masked_loss_and_ignores_prompt_tokens(tmp_path, corpus_cache):
    from mixtral_jax.data.pipeline import make_train_iterator
    from mixtral_jax.data.tokenizer import Tokenizer
    from mixtral_jax.training.metrics import read_metrics
    from mixtral_jax.training.step import make_eval_step
    from mixtral_jax.training.trainer import Trainer
    from mixtral_jax.training.evaluate import load_run_model
    from flax import nnx

    base = ["configs/quickstart.yaml", [f"run.out_dir={tmp_path}", *SMALL]]
    pretrained = Trainer(load_config(base[0], [*base[1], "run.name=pre", "train.steps=4"]))
    pretrained.fit()
    data = _instruct_jsonl(tmp_path / "capitals.jsonl")
    cfg = load_config(base[0], [*base[1], "run.name=sft", "train.steps=30", "train.log_every=1",
                                f"train.init_from={pretrained.run_dir}", f"data.source=instruct:{data}",
                                f"data.tokenizer.path={pretrained.run_dir / 'tokenizer.model'}",
                                "finetune.router_lr_scale=0.1"])
    Trainer(cfg).fit()
    losses = [r["lm_loss"] for r in read_metrics(cfg.run_dir) if "lm_loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses  # the masked (response-only) loss

    # Prompt tokens contribute nothing: rewriting every target outside the mask leaves the loss
    # unchanged, rewriting one response target changes it.
    tokenizer = Tokenizer.from_file(cfg.run_dir / "tokenizer.model")
    batch = next(make_train_iterator(cfg.data, tokenizer, seed=0))
    mask = batch["loss_mask"] > 0
    assert 0 < mask.mean() < 0.8
    model, _, _ = load_run_model(cfg.run_dir)
    graphdef, params, state = nnx.split(model, nnx.Param, ...)
    eval_step = jax.jit(make_eval_step(graphdef))
    loss = lambda b: float(eval_step(params, state, b)[0]) / float(b["loss_mask"].sum())  # noqa: E731
    reference = loss(batch)
    scrambled = dict(batch, targets=np.where(mask, batch["targets"], (batch["targets"] + 7) % 64))
    assert loss(scrambled) == pytest.approx(reference, rel=1e-6)
    one = batch["targets"].copy()
    row, col = map(int, np.argwhere(mask)[0])
    one[row, col] = (one[row, col] + 7) % cfg.model.vocab_size
    assert abs(loss(dict(batch, targets=one)) - reference) > 1e-4


def test_lora_run_exports_merged_weights_that_transformers_loads(tmp_path, corpus_cache):
    """A LoRA fine-tune's export holds W + (alpha / r) A B: transformers' logits on the exported
    directory equal the merged model's, and differ from the base run's (the adapters trained)."""
    torch = pytest.importorskip("torch", reason="compares against transformers")
    transformers = pytest.importorskip("transformers", reason="compares against transformers")
    from mixtral_jax.interop.convert import export_hf
    from mixtral_jax.training.evaluate import load_run_model
    from mixtral_jax.training.trainer import Trainer

    common = [f"run.out_dir={tmp_path}", *SMALL, "model.moe.num_experts=4"]
    base = Trainer(load_config("configs/quickstart.yaml", [*common, "run.name=base", "train.steps=2"]))
    base.fit()
    tuned = load_config("configs/quickstart.yaml", [
        *common, "run.name=lora", "train.steps=3", "optim.lr=3e-2", "finetune.lora.rank=4",
        f"train.init_from={base.run_dir}", f"data.tokenizer.path={base.run_dir / 'tokenizer.model'}"])
    Trainer(tuned).fit()
    out = export_hf(tuned.run_dir, tmp_path / "exported")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32,
                                                                 attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(3, 200, size=(2, 24))
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(tokens)).logits.numpy()
    merged, _, _ = load_run_model(tuned.run_dir)
    base_model, _, _ = load_run_model(base.run_dir)
    ours = np.asarray(merged(jax.numpy.asarray(tokens)).logits)
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    assert np.abs(ours - np.asarray(base_model(jax.numpy.asarray(tokens)).logits)).max() > 1e-3


MODERN = ["model.n_layers=3", "model.moe.num_experts=8", "model.moe.expert_hidden_dim=16",
          "model.moe.shared_experts=1", "model.moe.shared_gate=true", "model.moe.first_dense_layers=1",
          "model.moe.router=sigmoid_topk", "model.moe.renormalize=true", "model.qk_norm=head", "model.qkv_bias=true",
          "model.remat=dots_saveable"]


def test_lora_and_remat_on_shared_experts_and_mixed_layers():
    """LoRA adapts the routed and shared experts and the dense layer's MLP; biases and the
    shared gate get no adapter; the adapted model trains (with remat) from the base model."""
    cfg, mesh, program = _setup(*MODERN, "finetune.lora.rank=2",
                                "finetune.lora.targets=[attention,experts,shared_experts,mlp]")
    before, state, losses = _train(program, _batch(cfg, mesh), 4)
    adapted = {name.rsplit(".", 1)[0] for name in _flat(state["adapters"])}
    assert {"blocks.ffn.w_gate", "blocks.ffn.shared.w_up", "dense_blocks.ffn.w_down", "blocks.attn.wq"} <= adapted
    assert not any(n.endswith(("bq", "shared_gate")) for n in adapted)
    assert not _changed(before, _flat(state["params"]))  # base weights frozen
    assert losses[-1] < losses[0]
