"""The optimizer's global-norm clip against numpy: same rule and same (empty) state as optax's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mixtral_jax.training.optim import clip_by_global_norm


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clips / leaves unchanged
def test_clip_by_global_norm_matches_numpy(max_norm):
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": [rng.normal(size=5).astype(np.float32)]}
    norm = np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads)))
    factor = min(1.0, max_norm / norm)
    tx = clip_by_global_norm(max_norm)
    state = tx.init(grads)
    got, _ = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), state)
    for g, want in zip(jax.tree.leaves(got), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(g), want * factor, rtol=1e-6)
    clipped = np.sqrt(sum(np.sum(np.square(np.asarray(g), dtype=np.float64)) for g in jax.tree.leaves(got)))
    assert clipped == pytest.approx(min(norm, max_norm), rel=1e-5)
    # the same state as optax's transformation, so checkpoints written before keep loading
    assert jax.tree.structure(state) == jax.tree.structure(optax.clip_by_global_norm(max_norm).init(grads))
