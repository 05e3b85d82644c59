"""``torch_x86()`` on a LayerNorm / GELU / hard-swish MLP against torch FX: torch keeps those ops whole (LayerNorm
and GELU are single modules), so jquant must not place observers inside their JAX decompositions (LayerNorm's
``var + eps`` and ``y * gamma + beta``, GELU's ``tanh`` and ``x + 0.044715 x^3``, hard-swish's ``x + 3``)."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fx_oracle import fx_x86

import jquant

torch = pytest.importorskip("torch")
quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 16)
        self.gelu, self.fc3 = torch.nn.GELU(approximate="tanh"), torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.fc3(self.gelu(self.fc2(self.ln(self.fc1(x)))))


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln")(nn.Dense(16, name="fc1")(x))
        return nn.Dense(4, name="fc3")(nn.gelu(nn.Dense(16, name="fc2")(h), approximate=True))


def _np(t):
    return t.detach().numpy().astype(np.float32)


def test_layernorm_and_gelu_stay_whole_and_match_fx():
    torch.manual_seed(4)
    model = TorchMLP().eval()
    with torch.no_grad():
        model.ln.weight.uniform_(0.5, 1.5)
        model.ln.bias.uniform_(-0.3, 0.3)
    x_t, fresh = torch.randn(64, 8), torch.randn(64, 8) * 1.5
    _, reference_model, converted = fx_x86(model, x_t)
    reference = _np(reference_model(x_t))
    expected = {"calibration": (x_t, _np(converted(x_t))), "fresh": (fresh, _np(converted(fresh)))}
    variables = {"params": {
        "fc1": {"kernel": _np(model.fc1.weight).T, "bias": _np(model.fc1.bias)},
        "ln": {"scale": _np(model.ln.weight), "bias": _np(model.ln.bias)},
        "fc2": {"kernel": _np(model.fc2.weight).T, "bias": _np(model.fc2.bias)},
        "fc3": {"kernel": _np(model.fc3.weight).T, "bias": _np(model.fc3.bias)},
    }}
    x = jnp.asarray(_np(x_t))
    qf = jquant.quantize(FlaxMLP().apply, jquant.presets.torch_x86())
    qstate = qf.init(variables, x)
    quantized = [s for s in qf.sites if s.quantized]
    assert [s.primitive for s in quantized] == ["dot_general"] * 3  # nothing inside LayerNorm / GELU
    _, qstate = qf.apply(qstate, variables, x, mode="calibrate")
    step = float(qstate[quantized[-1].name]["output"].scale)
    out, _ = qf.apply(qstate, variables, x, mode="eval")
    error = np.abs(np.asarray(out) - reference)
    assert error.max() <= step * 1.001 and (error <= 1e-5).mean() >= 0.99, error.max() / step
    int_fn, int_params = jquant.convert(qf, qstate, variables, x)
    for batch, (inputs, want) in expected.items():
        error = np.abs(np.asarray(int_fn(int_params, jnp.asarray(_np(inputs)))) - want)
        assert (error <= step * 1.001).mean() >= 0.999 and error.max() <= 3 * step * 1.001, batch


def test_composite_activations_hold_no_sites():
    """jax.nn's composite activations (one jit call each) and an add of a constant are no sites under torch_x86."""

    def fn(p, x):
        h = x @ p["w"]
        h = jax.nn.hard_swish(h) + jax.nn.silu(h) + 1.0
        return h @ p["w2"]

    params = {"w": jnp.ones((4, 8)) * 0.1, "w2": jnp.ones((8, 2)) * 0.1}
    qf = jquant.quantize(fn, jquant.presets.torch_x86())
    qf.init(params, jnp.ones((3, 4)))
    quantized = [(s.primitive, len(s.operands)) for s in qf.sites if s.quantized]
    assert quantized == [("dot_general", 2), ("add", 2), ("dot_general", 2)], quantized  # hard_swish + silu only
