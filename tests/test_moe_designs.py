"""The MoE designs after Mixtral: fine-grained and shared experts, dense and sparse layers
mixed, DeepSeek-V3 routing, QK-norm and q/k/v bias. References: transformers' Dots1 router and
Qwen2-MoE block, a per-layer Python loop, and formulas written out in numpy."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mixtral_jax.config import ModelConfig, MoEConfig
from mixtral_jax.models.layer_plan import plan_segments, stack_index
from mixtral_jax.models.moe import MoEBlock, update_router_biases
from mixtral_jax.models.params import param_counts
from mixtral_jax.models.routing import load_balancing_loss, sigmoid_topk, update_router_bias
from mixtral_jax.models.transformer import Transformer
from mixtral_jax.training.cost import matmul_params_per_token

MODERN = ModelConfig(
    vocab_size=64, dim=32, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=12, hidden_dim=48, max_seq_len=32,
    qk_norm="head", qkv_bias=True,
    moe=MoEConfig(num_experts=8, top_k=3, expert_hidden_dim=16, shared_experts=2, shared_gate=True,
                  first_dense_layers=1, dense_layers=[3], router="sigmoid_topk", n_groups=4, topk_groups=2,
                  renormalize=True, routed_scaling=2.5, selection_bias=True))


def _with(cfg: ModelConfig, **moe) -> ModelConfig:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))


# ------------------------------------------------------------------ the layer plan

@pytest.mark.parametrize("kinds,want", [
    ((True,) * 32, [((True,), 32)]),  # Mixtral: one scan
    ((False,) * 3 + (True,) * 58, [((False,), 3), ((True,), 58)]),  # DeepSeek: first 3 dense
    ((False, True) * 12, [((False, True), 12)]),  # Qwen decoder_sparse_step 2
    ((False, True, True) * 4 + (False,), [((False, True, True), 4), ((False,), 1)]),
    ((False, True, True, False, True), [((False,), 1), ((True,), 2), ((False,), 1), ((True,), 1)]),
])
def test_plan_cuts_the_layers_into_repeated_units(kinds, want):
    segments = plan_segments(kinds)
    assert [(s.unit, s.repeats) for s in segments] == want
    # the segments cover every layer once, in order
    assert sum((s.unit * s.repeats for s in segments), ()) == kinds
    assert [s.start for s in segments] == list(np.cumsum([0] + [s.layers for s in segments[:-1]]))


def test_layer_pattern_keys_pick_the_sparse_layers():
    cfg = ModelConfig(n_layers=8, moe=MoEConfig(num_experts=4, first_dense_layers=1, sparse_every=2,
                                                dense_layers=[5]))
    # sparse iff i >= 1 and (i + 1) % 2 == 0 and i not in [5]
    assert cfg.sparse_layers == (False, True, False, True, False, False, False, True)
    assert stack_index(cfg.sparse_layers)[5] == (False, 3) and stack_index(cfg.sparse_layers)[7] == (True, 2)
    assert not any(ModelConfig(n_layers=4).sparse_layers)


@pytest.fixture(scope="module")
def modern():
    return Transformer(MODERN, rngs=nnx.Rngs(0))


def _tokens(b: int = 2, t: int = 10) -> jax.Array:
    return jax.random.randint(jax.random.key(1), (b, t), 0, MODERN.vocab_size)


def test_mixed_layers_run_in_order(modern):
    """The scans over the two stacks equal applying every layer in a Python loop, layer by
    layer in model order, each merged from its own stack's slice."""
    tokens = _tokens()
    got = modern(tokens)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    segments = jnp.ones((b, t), jnp.int32)
    x = jnp.take(modern.embed[...], tokens, axis=0)
    stacks = {True: nnx.split(modern.blocks), False: nnx.split(modern.dense_blocks)}
    loads = []
    for sparse, index in stack_index(MODERN.sparse_layers):
        graphdef, state = stacks[sparse]
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))
        x, stats = block(x, positions, segments)
        if sparse:
            loads.append(stats["expert_load"])
    want = modern._head(x)
    np.testing.assert_allclose(got.logits, want, atol=1e-5)
    np.testing.assert_allclose(got.aux["expert_load"], jnp.stack(loads), atol=1e-7)
    assert got.aux["expert_load"].shape == (4, 8)  # four sparse layers of six


def test_mixed_layers_decode_equals_the_forward_pass(modern):
    tokens = _tokens()
    want = modern(tokens).logits
    cache = modern.init_cache(2, 16)
    first, cache = modern.decode(tokens[:, :6], jnp.broadcast_to(jnp.arange(6), (2, 6)), cache)
    rest = [first]
    for i in range(6, 10):
        step, cache = modern.decode(tokens[:, i:i + 1], jnp.full((2, 1), i), cache)
        rest.append(step)
    np.testing.assert_allclose(jnp.concatenate(rest, axis=1), want, atol=1e-5)


def test_compile_size_is_flat_in_depth():
    """Layers repeated in a pattern are scanned: 4 and 16 units of [dense, sparse] trace to the
    same number of operations (the scan body is traced once)."""
    def ops(n_layers: int) -> int:
        cfg = dataclasses.replace(MODERN, n_layers=n_layers, scan_unroll=1)
        cfg = _with(cfg, first_dense_layers=0, dense_layers=[], sparse_every=2)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        fn = lambda s, x: nnx.merge(graphdef, s)(x).logits  # noqa: E731
        return len(jax.make_jaxpr(fn)(state, _tokens()).eqns)

    assert ops(8) == ops(32)


# ------------------------------------------------------------------ routing against references

def _dots1_router(e: int, k: int, groups: int, topk_groups: int, scaling: float, renorm: bool, seed: int):
    from transformers.models.dots1.configuration_dots1 import Dots1Config
    from transformers.models.dots1.modeling_dots1 import Dots1TopkRouter

    cfg = Dots1Config(hidden_size=16, n_routed_experts=e, num_experts_per_tok=k, n_group=groups,
                      topk_group=topk_groups, routed_scaling_factor=scaling, norm_topk_prob=renorm)
    router = Dots1TopkRouter(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        router.e_score_correction_bias.copy_(0.3 * torch.randn(e, generator=gen))
    return router


@pytest.mark.parametrize("e,k,groups,topk_groups,scaling,renorm", [
    (16, 4, 4, 2, 2.5, True), (16, 3, 8, 3, 1.0, False), (12, 2, 1, 1, 1.5, True)])
def test_sigmoid_topk_equals_dots1_router(e, k, groups, topk_groups, scaling, renorm):
    router = _dots1_router(e, k, groups, topk_groups, scaling, renorm, seed=e + k)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, want_w, want_ids = router(x)
    moe = MoEConfig(num_experts=e, top_k=k, router="sigmoid_topk", n_groups=groups, topk_groups=topk_groups,
                    routed_scaling=scaling, renormalize=renorm)
    from mixtral_jax.models.routing import ROUTERS
    got = ROUTERS.get("sigmoid_topk")(moe)(jnp.asarray(logits.numpy()),
                                           jnp.asarray(router.e_score_correction_bias.numpy()))
    # transformers returns its k in no particular order (sorted=False): compare per-token sets
    order_got, order_want = np.argsort(got.expert_ids, -1), np.argsort(want_ids.numpy(), -1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(got.expert_ids), order_got, -1),
                                  np.take_along_axis(want_ids.numpy(), order_want, -1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(got.weights), order_got, -1),
                               np.take_along_axis(want_w.numpy(), order_want, -1), rtol=1e-6, atol=1e-7)
    if groups > 1:  # the restriction bites: some token's plain top-k reaches outside its groups
        plain = sigmoid_topk(jnp.asarray(logits.numpy()), k, jnp.asarray(router.e_score_correction_bias.numpy()))
        assert not np.array_equal(np.sort(plain.expert_ids, -1), np.sort(got.expert_ids, -1))


def test_shared_expert_and_gate_equal_qwen2_moe_block():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    d, e, k, h, hs = 16, 6, 2, 8, 24
    hf_cfg = Qwen2MoeConfig(hidden_size=d, num_experts=e, num_experts_per_tok=k, moe_intermediate_size=h,
                            shared_expert_intermediate_size=hs, norm_topk_prob=False)
    block = Qwen2MoeSparseMoeBlock(hf_cfg).float()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    cfg = ModelConfig(dim=d, n_layers=1, hidden_dim=64, moe=MoEConfig(
        num_experts=e, top_k=k, router="softmax_topk", expert_hidden_dim=h, shared_experts=1,
        shared_hidden_dim=hs, shared_gate=True, dispatch="dropless"))
    ours = MoEBlock(cfg, rngs=nnx.Rngs(0))
    t = lambda p: jnp.asarray(p.detach().numpy())  # noqa: E731
    gate_up = t(block.experts.gate_up_proj)  # [E, 2h, d]
    ours.router[...] = t(block.gate.weight).T
    ours.w_gate[...] = gate_up[:, :h].transpose(0, 2, 1)
    ours.w_up[...] = gate_up[:, h:].transpose(0, 2, 1)
    ours.w_down[...] = t(block.experts.down_proj).transpose(0, 2, 1)
    ours.shared.w_gate[...] = t(block.shared_expert.gate_proj.weight).T
    ours.shared.w_up[...] = t(block.shared_expert.up_proj.weight).T
    ours.shared.w_down[...] = t(block.shared_expert.down_proj.weight).T
    ours.shared_gate[...] = t(block.shared_expert_gate.weight).T
    x = torch.randn(2, 7, d, generator=gen)
    with torch.no_grad():
        want = block(x).numpy()
    got, _ = ours(jnp.asarray(x.numpy()))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_sigmoid_aux_loss_is_deepseek_v3_sequence_balance_loss():
    """DeepSeek-V3 eq. 17-20 written out: per sequence, f_i = E / (K T) * #tokens choosing i,
    P_i = mean_t s_it / sum_j s_jt (sigmoid scores), L = sum_i f_i P_i; averaged over sequences."""
    b, t, d, e, k = 3, 20, 16, 8, 2
    cfg = ModelConfig(dim=d, n_layers=1, hidden_dim=32, moe=MoEConfig(
        num_experts=e, top_k=k, router="sigmoid_topk", aux_loss_scope="sequence", expert_hidden_dim=8))
    block = MoEBlock(cfg, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(0), (b, t, d))
    _, stats = block(x)
    logits = np.asarray(x).reshape(b * t, d) @ np.asarray(block.router[...])
    scores = 1 / (1 + np.exp(-logits))
    chosen = np.argsort(-scores, axis=-1)[:, :k]
    want = []
    for row in range(b):
        s = scores[row * t:(row + 1) * t]
        counts = np.zeros(e)
        for ids in chosen[row * t:(row + 1) * t]:
            counts[ids] += 1
        f = e / (k * t) * counts
        p = np.mean(s / s.sum(-1, keepdims=True), axis=0)
        want.append(np.sum(f * p))
    np.testing.assert_allclose(stats["aux_loss"], np.mean(want), rtol=1e-5)
    # the sigmoid router's load-balancing gradient flows through the scores
    probs = jnp.ones((1, 4, 4)) / 4
    assert float(load_balancing_loss(probs, jnp.eye(4)[None])) == pytest.approx(1.0)


def test_bias_recentring_keeps_the_choice_and_zeroes_the_mean():
    bias = jnp.array([[0.3, -0.1, 0.2, 0.0]])
    load = jnp.array([[0.4, 0.1, 0.3, 0.2]])
    plain = update_router_bias(bias, load, 0.05)
    centred = update_router_bias(bias, load, 0.05, recenter=True)
    np.testing.assert_allclose(plain, [[0.25, -0.05, 0.15, 0.05]], atol=1e-7)  # by hand
    np.testing.assert_allclose(centred, plain - jnp.mean(plain), atol=1e-7)
    assert abs(float(jnp.mean(centred))) < 1e-7
    logits = jax.random.normal(jax.random.key(0), (32, 4))
    assert np.array_equal(sigmoid_topk(logits, 2, plain[0]).expert_ids,
                          sigmoid_topk(logits, 2, centred[0]).expert_ids)


def test_model_state_bias_update_reaches_every_sparse_layer(modern):
    state = nnx.state(modern)
    load = jnp.tile(jnp.arange(8.0)[None] / 28.0, (4, 1))
    new = update_router_biases(state, load, 0.1, recenter=True)
    bias = new["blocks"]["ffn"]["router_bias"][...]
    assert bias.shape == (4, 8)
    np.testing.assert_allclose(jnp.mean(bias, -1), 0.0, atol=1e-7)
    assert bool(jnp.all(bias[:, 0] > bias[:, -1]))  # the least-loaded expert moved up


# ------------------------------------------------------------------ accounting

def test_flops_count_shared_dense_and_router_parameters():
    """Matmul parameters a token passes through = active parameters less norms and the input
    embedding (a lookup): with shared experts, dense layers and a router in the count."""
    cfg = dataclasses.replace(MODERN, qkv_bias=False)
    counts = param_counts(cfg)
    assert matmul_params_per_token(cfg) == counts["active"] - counts["norms"] - counts["embedding"]
    # and by hand: 6 layers of attention, 2 dense FFNs, 4 sparse FFNs of k=3 experts + router +
    # shared (2 x 16 wide) + its gate, the LM head
    attention = 32 * 12 * (2 * 4 + 2 * 2)
    sparse = 3 * 3 * 32 * 16 + 32 * 8 + 3 * 32 * 32 + 32
    want = 6 * attention + 2 * 3 * 32 * 48 + 4 * sparse + 32 * 64
    assert matmul_params_per_token(cfg) == want
    assert counts["experts"] == 4 * 8 * 3 * 32 * 16 and counts["mlp"] == 2 * 3 * 32 * 48
    assert counts["active"] == counts["total"] - 4 * 5 * 3 * 32 * 16


def test_qk_norm_and_bias_parameters_have_the_published_shapes():
    state = nnx.state(Transformer(_full_norm_cfg(), rngs=nnx.Rngs(0)), nnx.Param)
    attn = state["blocks"]["attn"]
    assert attn["q_norm"]["norm"]["weight"].shape == (2, 4 * 12)  # OLMoE: over the projection
    assert attn["k_norm"]["norm"]["weight"].shape == (2, 2 * 12)
    head = nnx.state(Transformer(dataclasses.replace(_full_norm_cfg(), qk_norm="head"), rngs=nnx.Rngs(0)))
    assert head["blocks"]["attn"]["q_norm"]["norm"]["weight"].shape == (2, 12)
    assert head["blocks"]["attn"]["bq"].shape == (2, 4, 12)


def _full_norm_cfg() -> ModelConfig:
    return dataclasses.replace(MODERN, n_layers=2, qk_norm="full",
                               moe=MoEConfig(num_experts=4, top_k=2, router="softmax_topk"))


def test_qk_norm_normalises_queries_before_rope():
    """With qk_norm head and unit weights, every query and key head vector has RMS 1 (RoPE
    preserves norms), whatever the projection's scale."""
    cfg = dataclasses.replace(MODERN, n_layers=1, qkv_bias=False, moe=MoEConfig())
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model.blocks)
    attn = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state)).attn
    x = 5.0 * jax.random.normal(jax.random.key(0), (2, 6, cfg.dim))
    q, k, _ = attn._project(x, jnp.broadcast_to(jnp.arange(6), (2, 6)))
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(q ** 2, -1)), 1.0, rtol=1e-4)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(k ** 2, -1)), 1.0, rtol=1e-4)


@pytest.mark.parametrize("dispatch", ["dense", "capacity"])
def test_every_dispatch_path_computes_the_same_modern_block(dispatch):
    """Fine-grained, shared and gated experts with group-limited sigmoid routing: the dense
    reference and capacity dispatch (with room for every slot) equal dropless."""
    cfg = dataclasses.replace(MODERN, n_layers=1)
    x = jax.random.normal(jax.random.key(4), (2, 9, cfg.dim))
    want, want_stats = MoEBlock(_with(cfg, dispatch="dropless"), rngs=nnx.Rngs(5))(x)
    got, stats = MoEBlock(_with(cfg, dispatch=dispatch, capacity_factor=8.0), rngs=nnx.Rngs(5))(x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert float(stats["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(stats["aux_loss"], want_stats["aux_loss"], rtol=1e-6)


@pytest.mark.parametrize("n_layers,first,every,dense", [
    (32, 0, 1, []), (61, 3, 1, []), (24, 0, 2, []), (13, 2, 3, []), (10, 1, 2, [5, 7]), (5, 7, 1, [])])
def test_arithmetic_plan_and_count_match_the_listed_layers(n_layers, first, every, dense):
    """The constant-time plan and sparse-layer count (what `params` uses for any depth) equal
    the per-layer rule written out."""
    from mixtral_jax.models.layer_plan import plan_model

    cfg = ModelConfig(n_layers=n_layers, moe=MoEConfig(num_experts=4, first_dense_layers=first,
                                                       sparse_every=every, dense_layers=dense))
    listed = tuple(i >= first and (i + 1) % every == 0 and i not in dense for i in range(n_layers))
    segments = plan_model(n_layers, True, first, every, dense)
    assert sum((s.unit * s.repeats for s in segments), ()) == listed == cfg.sparse_layers
    assert cfg.n_sparse_layers == sum(listed)
    assert len(segments) <= 2 + every or dense
