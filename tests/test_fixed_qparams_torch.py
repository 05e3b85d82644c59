"""Fixed-qparams outputs (sigmoid, tanh, an ``nn.Softmax`` module) between two linears, against torch FX's x86
mapping: the activation gets torch's constant qparams, its consumer reads them (no observer of its own), and
``eval`` / ``convert`` equal torch's reference model / ``convert_fx``."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fx_oracle import fx_x86

import jquant
from jquant.transform.specs import FixedQParamsSpec, Rule

torch = pytest.importorskip("torch")
quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")

# torch module, jax function, width, pre-activation shift. The shifts keep the 8-bit activations <= 128, where
# fbgemm's int16 pair sums cannot saturate on CPUs without VNNI (its result is then exact on any x86 CPU).
CASES = {
    "sigmoid": (torch.nn.Sigmoid, jax.nn.sigmoid, 6, -3.0),
    "tanh": (torch.nn.Tanh, jnp.tanh, 6, -3.0),
    "softmax": (lambda: torch.nn.Softmax(dim=-1), lambda v: jax.nn.softmax(v, axis=-1), 32, 0.0),
}


class Net(torch.nn.Module):
    def __init__(self, act, width):
        super().__init__()
        self.fc, self.act, self.fc2 = torch.nn.Linear(8, width), act(), torch.nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc(x)))


def _np(t):
    return t.detach().numpy().astype(np.float32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixed_qparams_activation_between_linears_matches_fx(case):
    module, jax_act, width, shift = CASES[case]
    torch.manual_seed(0)
    model = Net(module, width).eval()
    with torch.no_grad():
        model.fc.bias += shift
        if case == "softmax":
            model.fc.weight *= 0.1  # flat probabilities: small integers (see CASES)
    x_t = torch.randn(64, 8)
    prepared, reference_model, converted = fx_x86(model, x_t)
    fixed = prepared.activation_post_process_2
    reference, expected = _np(reference_model(x_t)), _np(converted(x_t))
    assert type(fixed).__name__ == "FixedQParamsObserver"
    torch_scale, torch_zero_point = (v.item() for v in fixed.calculate_qparams())

    params = {"w": _np(model.fc.weight).T, "b": _np(model.fc.bias), "w2": _np(model.fc2.weight).T,
              "b2": _np(model.fc2.bias)}
    qf = jquant.quantize(lambda p, x: jax_act(x @ p["w"] + p["b"]) @ p["w2"] + p["b2"],
                         jquant.presets.torch_x86(fixed_softmax=case == "softmax"))
    x = jnp.asarray(_np(x_t))
    qstate = qf.init(params, x)
    fc, act, fc2 = qf.sites
    assert act.primitive == {"sigmoid": "logistic"}.get(case, case)
    assert isinstance(act.output_spec, FixedQParamsSpec)
    assert (act.output_spec.scale, act.output_spec.zero_point) == (torch_scale, torch_zero_point)
    assert fc2.operands[0].spec == act.output_spec and "input" not in qstate[fc2.name]  # no observer of its own
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")
    step = float(qstate[fc2.name]["output"].scale)
    out, _ = qf.apply(qstate, params, x, mode="eval")
    error = np.abs(np.asarray(out) - reference)
    assert error.max() <= step * 1.001 and (error <= 1e-5).mean() >= 0.99, error.max() / step
    int_fn, int_params = jquant.convert(qf, qstate, params, x)
    error = np.abs(np.asarray(int_fn(int_params, x)) - expected)
    assert (error <= step * 1.001).mean() >= 0.999 and error.max() <= 2 * step * 1.001, error.max() / step


def test_softmax_site_takes_an_output_spec_only():
    spec = jquant.QuantizationSpec("uint8")
    qf = jquant.quantize(lambda p, x: jax.nn.softmax(x @ p["w"]),
                         [Rule(primitives=("softmax",), inputs=spec, output=spec)])
    with pytest.raises(ValueError, match=r"softmax.*only an output spec"):
        qf.init({"w": jnp.ones((4, 3))}, jnp.ones((2, 4)))


def test_softmax_pattern_needs_the_whole_softmax():
    """A div of an exp by a sum that is not a softmax (no max subtracted) is not a softmax site."""
    rule = Rule(primitives=("softmax",), output=FixedQParamsSpec(1 / 256, 0, "uint8"))

    def not_softmax(p, x):
        e = jnp.exp(x @ p["w"])
        return e / e.sum(-1, keepdims=True)

    def softmax(p, x):
        return jax.nn.softmax(x @ p["w"], axis=-1)

    params, x = {"w": jnp.ones((4, 3))}, jnp.ones((2, 4))
    qf = jquant.quantize(not_softmax, [Rule(), rule])
    with pytest.warns(UserWarning, match="matched no site"):
        qf.init(params, x)
    assert [s.primitive for s in qf.sites] == ["dot_general"]
    qf = jquant.quantize(softmax, [Rule(), rule])
    qf.init(params, x)
    assert [s.primitive for s in qf.sites] == ["dot_general", "softmax"]
