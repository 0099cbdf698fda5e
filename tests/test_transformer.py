"""Transformer forward: scanned layers, output dtypes and shapes, mixed precision, packing."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mixtral_jax.config import load_config
from mixtral_jax.models.transformer import Transformer

SMALL = ["model.n_layers=2", "model.vocab_size=128", "model.dim=32", "model.hidden_dim=48",
         "model.head_dim=8", "model.sliding_window=6"]


def make(preset: str, *overrides: str) -> Transformer:
    cfg = load_config(f"configs/model/{preset}.yaml", [*SMALL, *overrides]).model
    return Transformer(cfg, rngs=nnx.Rngs(0))


def forward(model: Transformer, tokens, **kw):
    """One jitted call through split/merge, the way the trainer uses the model."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, t, kw: nnx.merge(graphdef, s)(t, **kw))(state, tokens, kw)


@pytest.mark.parametrize("preset", ["tiny_dense", "tiny_moe"])
def test_forward_shapes_dtypes_and_aux(preset):
    model = make(preset)
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 128)
    logits, aux = forward(model, tokens)
    assert logits.shape == (2, 10, 128) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert aux["aux_loss"].shape == () and aux["z_loss"].shape == ()
    if preset == "tiny_moe":
        assert aux["expert_load"].shape == (2, 8)
        np.testing.assert_allclose(np.asarray(aux["expert_load"].sum(-1)), 1.0, rtol=1e-6)
        assert 0.0 < float(aux["aux_loss"]) < 8.0 and float(aux["z_loss"]) > 0.0  # E is an upper bound
        assert {"router_entropy", "dropped_fraction"} <= set(aux)
    else:
        assert float(aux["aux_loss"]) == 0.0 and float(aux["z_loss"]) == 0.0
    # layers are stacked on a leading axis that carries the "layers" logical name
    wq = model.blocks.attn.wq
    assert wq.shape == (2, 32, 4, 8)
    assert wq.get_metadata()["out_sharding"] == ("layers", "embed", "q_heads", "head_dim")


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = make("tiny_moe", "model.dtype=bfloat16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
    logits, aux = forward(model, jnp.zeros((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and aux["aux_loss"].dtype == jnp.float32


def test_every_param_has_logical_axes():
    model = make("tiny_moe", "model.tie_embeddings=true")
    allowed = {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "expert", "layers", None}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == var.ndim and set(axes) <= allowed, path
        assert (axes[0] == "layers") == (path[0] == "blocks"), path


def test_packed_documents_are_independent_and_causal():
    """Two packed documents give the same logits as each run alone (positions restart)."""
    model = make("tiny_dense")
    doc_a = jax.random.randint(jax.random.key(1), (1, 5), 0, 128)
    doc_b = jax.random.randint(jax.random.key(2), (1, 7), 0, 128)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    positions = jnp.array([list(range(5)) + list(range(7))])
    segments = jnp.array([[1] * 5 + [2] * 7])
    logits, _ = forward(model, packed, positions=positions, segment_ids=segments)
    alone_b, _ = forward(model, doc_b)
    np.testing.assert_allclose(np.asarray(logits[:, 5:]), np.asarray(alone_b), rtol=1e-4, atol=1e-5)
    # changing the last token of doc b changes nothing before it
    changed, _ = forward(model, packed.at[0, -1].set((packed[0, -1] + 1) % 128),
                         positions=positions, segment_ids=segments)
    np.testing.assert_allclose(np.asarray(changed[:, :-1]), np.asarray(logits[:, :-1]), rtol=1e-5, atol=1e-6)


def test_remat_and_scan_unroll_do_not_change_loss_or_gradients():
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 128)
    results = []
    for override in ("model.remat=none", "model.remat=full", "model.scan_unroll=3"):  # 3 of 4 layers: a remainder
        graphdef, params, rest = nnx.split(make("tiny_moe", override), nnx.Param, ...)

        def loss(p):
            logits, aux = nnx.merge(graphdef, p, rest)(tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["aux_loss"]

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (l0, g0), *others = results
    for l1, g1 in others:
        np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_scan_unroll_auto_unrolls_shallow_models_on_cpu_only():
    from mixtral_jax.kernels.backend import CPU_MAX_UNROLLED_LAYERS, Kernels

    cpu, tpu = Kernels.for_backend("cpu"), Kernels.for_backend("tpu")
    deep = CPU_MAX_UNROLLED_LAYERS + 1
    assert cpu.scan_unroll("auto", 4) == 4 and cpu.scan_unroll("auto", CPU_MAX_UNROLLED_LAYERS) == CPU_MAX_UNROLLED_LAYERS
    assert cpu.scan_unroll("auto", deep) == 1 and tpu.scan_unroll("auto", 4) == 1
    assert cpu.scan_unroll(3, 4) == 3 and cpu.scan_unroll(16, 4) == 4 and tpu.scan_unroll(2, deep) == 2
    cfg = load_config("configs/model/tiny_dense.yaml", [*SMALL, "model.n_layers=2"]).model
    assert cfg.scan_unroll == "auto"  # the default
    assert nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))).scan_unroll == 2  # this suite runs on CPU
