"""scikit-learn's digits (8x8 images, ships with the package: no download) and a small linen CNN for it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jquant.flax.conv_bn import ConvBN


def load_digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)``; images NHWC float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[..., None]
    y = data.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


class DigitsCNN(nn.Module):
    """ConvBN-ReLU x2 (BN folded into the conv for QAT), then two Dense layers: about 40k parameters."""

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, freeze_bn: Any = False) -> jnp.ndarray:
        x = nn.relu(ConvBN(16, (3, 3))(x, train, freeze_bn))
        # explicit symmetric padding: "SAME" pads a stride-2 conv unevenly, unlike torch's padding=1
        x = nn.relu(ConvBN(32, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x, train, freeze_bn))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of shuffled, full batches."""
    order = np.random.default_rng(seed).permutation(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jnp.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(jnp.argmax(logits, -1)) == labels).mean())


def train_float(epochs: int = 8, batch_size: int = 64, seed: int = 0, learning_rate: float = 3e-3):
    """Train ``DigitsCNN`` in float; returns ``(model, variables, data)``."""
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    model = DigitsCNN()
    variables = model.init(jax.random.PRNGKey(seed), x_train[:2])
    tx = optax.adam(learning_rate)
    opt_state = tx.init(variables["params"])

    @jax.jit
    def step(variables, opt_state, xb, yb):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, xb, train=True, mutable=["batch_stats"]
            )
            return cross_entropy(logits, yb), updates

        (_, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        param_updates, opt_state = tx.update(grads, opt_state, variables["params"])
        params = optax.apply_updates(variables["params"], param_updates)
        return {"params": params, "batch_stats": updates["batch_stats"]}, opt_state

    for epoch in range(epochs):
        for xb, yb in batches(x_train, y_train, batch_size, seed + epoch):
            variables, opt_state = step(variables, opt_state, xb, yb)
    return model, variables, (x_train, y_train, x_test, y_test)
