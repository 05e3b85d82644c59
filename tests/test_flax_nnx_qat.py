"""QAT of a Flax nnx model through QATModule: the qstate lives in an nnx Variable beside the params."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jquant
from jquant.examples.digits import accuracy, batches, cross_entropy, load_digits_split
from jquant.flax import QATModule, QState


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, 64, rngs=rngs)
        self.norm = nnx.BatchNorm(64, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return self.out(nnx.relu(self.norm(self.hidden(x))))


# QATModule must not trigger flax's ``Variable.value`` deprecation (issue #12, item 13)
@pytest.mark.filterwarnings(r"error:'\.value' (access|setter) is now deprecated:DeprecationWarning")
def test_nnx_qat_trains_and_matches_the_functional_api():
    x_train, y_train, x_test, y_test = load_digits_split()
    model = NnxMLP(nnx.Rngs(0))
    wrapper = QATModule(model, x_train[:32], config=jquant.presets.qat_int8(), mode="calibrate")
    optimizer = nnx.Optimizer(wrapper, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(wrapper, optimizer, xb, yb):
        def loss_fn(w):
            return cross_entropy(w(xb), yb)

        loss, grads = nnx.value_and_grad(loss_fn)(wrapper)
        optimizer.update(wrapper, grads)
        return loss

    before = jax.tree.map(np.asarray, nnx.state(wrapper, QState))
    for xb, yb in list(batches(x_train, y_train, 64, 0))[:3]:
        step(wrapper, optimizer, xb, yb)
    after = jax.tree.map(np.asarray, nnx.state(wrapper, QState))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after)
    assert any(jax.tree.leaves(changed)), "calibration steps update the QState variables"
    wrapper.set_mode("qat")
    for epoch in range(4):
        for xb, yb in batches(x_train, y_train, 64, epoch + 1):
            step(wrapper, optimizer, xb, yb)
    wrapper.set_mode("eval")
    model.eval()
    logits = wrapper(x_test)
    assert accuracy(logits, y_test) > 0.93
    # eval() switched BatchNorm to its running statistics: predictions do not depend on the batch
    np.testing.assert_allclose(np.asarray(wrapper(x_test[:7])), np.asarray(logits[:7]), atol=1e-4)
    # the wrapper is the functional API underneath: same numbers from qf.apply
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    (direct, _), _ = wrapper.quantized.apply(wrapper.qstate.get_value(), params, rest, x_test, mode="eval")
    assert np.array_equal(np.asarray(direct), np.asarray(logits))
    with pytest.raises(ValueError, match="mode: expected one of"):
        wrapper.set_mode("train")
    # the quantized sites are named by nnx parameter path
    assert any("hidden" in site.name for site in wrapper.quantized.sites)
