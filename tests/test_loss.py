"""The language-model loss and its hand-written gradient against numpy: the cross-entropy sums
`train` optimises and the (softmax - onehot) gradient, with masked tokens and large logits."""

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.training.step import cross_entropy_sums


def np_loss_and_grad(logits, targets, mask):
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    nll = -np.log(np.take_along_axis(probs, targets[..., None], -1)[..., 0])
    onehot = np.eye(logits.shape[-1])[targets]
    return (nll * mask).sum(), (probs - onehot) * mask[..., None]


def test_cross_entropy_sums_and_gradient_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)) * 4
    logits[0, 0, 3] = 80.0  # far above the rest: a naive exp would overflow float32's comfort
    targets = rng.integers(0, 11, (2, 5))
    mask = (rng.random((2, 5)) > 0.3).astype(np.float64)
    want, want_grad = np_loss_and_grad(logits, targets, mask)

    def total(lg):
        return cross_entropy_sums(lg, jnp.asarray(targets, jnp.int32), jnp.asarray(mask))[0]

    value, grad = jax.value_and_grad(total)(jnp.asarray(logits, jnp.float32))
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)
    count = cross_entropy_sums(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(mask))[1]
    assert float(count) == mask.sum()
