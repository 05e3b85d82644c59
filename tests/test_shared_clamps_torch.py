"""Standalone ReLU / ReLU6 / Hardtanh on a quantized value against torch FX's x86 mapping: torch's ``nn.ReLU``,
``nn.ReLU6`` and ``nn.Hardtanh`` share their input's observer, so the next conv reads the previous conv's qparams;
jquant's ``torch_x86()`` places the same single observer (for ``jax.nn.relu``, ``jax.nn.relu6``, ``jnp.clip``), and
eval / convert equal the reference model / ``convert_fx``, the clamp running on the integers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fx_oracle import assert_eval_and_convert_match_fx, assert_slots_hold_fx_qparams, distinct_observers, fx_x86
from jax import lax

import jquant
from jquant.transform import View

torch = pytest.importorskip("torch")
quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")


class TorchNet(torch.nn.Module):
    """``lenet``: conv -> max-pool -> ReLU (LeNet order); ``mobilenet``: conv-bn -> ReLU6 -> conv -> Hardtanh."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.conv1, self.bn = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.conv2, self.fc = torch.nn.Conv2d(8, 4, 3, padding=1), torch.nn.Linear(4 * 4 * 4, 5)
        self.pool, self.relu, self.relu6 = torch.nn.MaxPool2d(2), torch.nn.ReLU(), torch.nn.ReLU6()
        self.hardtanh = torch.nn.Hardtanh(-1.0, 1.0)

    def forward(self, x):
        if self.kind == "lenet":
            y = self.conv2(self.relu(self.pool(self.conv1(x))))
        else:
            y = self.hardtanh(self.conv2(self.relu6(self.bn(self.conv1(x)))))
            y = self.pool(y)
        return self.fc(torch.flatten(y, 1))


def _conv(x, w, b):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b


def _max_pool(y):
    return lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def jax_net(kind, p, x):
    if kind == "lenet":
        y = _conv(jax.nn.relu(_max_pool(_conv(x, p["w1"], p["b1"]))), p["w2"], p["b2"])
    else:
        y = _conv(x, p["w1"], p["b1"])
        y = jax.nn.relu6((y - p["mean"]) * p["gamma"] / jnp.sqrt(p["var"] + 1e-5) + p["beta"])
        y = _max_pool(jnp.clip(_conv(y, p["w2"], p["b2"]), -1.0, 1.0))
    return y.transpose(0, 3, 1, 2).reshape(y.shape[0], -1) @ p["wf"] + p["bf"]


def _np(t):
    return t.detach().numpy().astype(np.float32)


@pytest.mark.parametrize("kind, shared", [("lenet", "relu"), ("mobilenet", "clamp")])
def test_standalone_clamps_share_their_input_observer_as_fx(kind, shared):
    torch.manual_seed(2)
    model = TorchNet(kind).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.conv2.weight *= 4  # conv2's outputs reach past Hardtanh's bounds
    x_t, fresh = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8) * 1.5  # one batch size: one compilation
    prepared, reference_model, converted = fx_x86(model, x_t)
    observers, reference = distinct_observers(prepared), _np(reference_model(x_t))
    int8 = {"calibration": (x_t, _np(converted(x_t))), "fresh": (fresh, _np(converted(fresh)))}
    # torch: x, conv1 (shared by the pool / clamp), conv2 (shared by the clamp / pool / flatten), fc
    assert len(observers) == 4
    w = lambda conv: _np(conv.weight).transpose(2, 3, 1, 0)  # noqa: E731  OIHW -> HWIO
    bn = model.bn
    params = {"w1": w(model.conv1), "b1": _np(model.conv1.bias), "w2": w(model.conv2), "b2": _np(model.conv2.bias),
              "wf": _np(model.fc.weight).T, "bf": _np(model.fc.bias), "mean": _np(bn.running_mean),
              "var": _np(bn.running_var), "gamma": _np(bn.weight), "beta": _np(bn.bias)}
    x = jnp.asarray(_np(x_t).transpose(0, 2, 3, 1))
    qf = jquant.quantize(lambda p, x: jax_net(kind, p, x), jquant.presets.torch_x86())
    qstate = qf.init(params, x)
    conv1, conv2, fc = qf.sites
    views = {(v.primitive, v.name) for v in qf.plan(params, x).by_eqn.values() if isinstance(v, View)}
    assert (shared, conv1.name) in views
    assert conv2.operands[0].spec.site == conv1.name  # no observer of its own after the clamp
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")
    slots = [qstate[conv1.name]["input"], qstate[conv1.name]["output"], qstate[conv2.name]["output"],
             qstate[fc.name]["output"]]
    assert_slots_hold_fx_qparams(slots, observers)
    step = float(qstate[fc.name]["output"].scale)
    int_fn, int_params = assert_eval_and_convert_match_fx(qf, qstate, params, x, reference, int8, step)
    # The clamps run on the 8-bit values: one integer max / min per bound (ReLU: 1; ReLU6 and the clip: 2 each).
    jaxpr = str(jax.make_jaxpr(int_fn)(int_params, x))
    int_clamps = re.findall(r"u8\[8,\d+,\d+,\d+\] = (?:max|min) ", jaxpr)
    assert len(int_clamps) == (1 if kind == "lenet" else 4), int_clamps
