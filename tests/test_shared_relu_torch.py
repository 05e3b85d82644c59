"""A standalone ReLU on a quantized value (conv -> max-pool -> ReLU, the LeNet order) against torch FX's x86
mapping: torch's ``nn.ReLU`` shares its input's observer, so the next conv reads the first conv's qparams; jquant's
``torch_x86()`` places the same single observer, and eval / convert equal the reference model / ``convert_fx``."""

import copy
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fx_oracle import assert_eval_and_convert_match_fx, assert_slots_hold_fx_qparams
from jax import lax

import jquant
from jquant.transform import View

torch = pytest.importorskip("torch")
quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")


class LeNetOrder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.pool, self.relu = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.MaxPool2d(2), torch.nn.ReLU()
        self.conv2, self.fc = torch.nn.Conv2d(8, 4, 3, padding=1), torch.nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        y = self.conv2(self.relu(self.pool(self.conv1(x))))
        return self.fc(torch.flatten(y, 1))


def _conv(x, w, b):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b


def jax_net(p, x):
    y = lax.reduce_window(_conv(x, p["w1"], p["b1"]), -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    y = _conv(jax.nn.relu(y), p["w2"], p["b2"])
    return y.transpose(0, 3, 1, 2).reshape(y.shape[0], -1) @ p["wf"] + p["bf"]


def _np(t):
    return t.detach().numpy().astype(np.float32)


def test_standalone_relu_shares_its_input_observer_as_fx():
    torch.manual_seed(2)
    model = LeNetOrder().eval()
    x_t, fresh = torch.randn(8, 3, 8, 8), torch.randn(32, 3, 8, 8) * 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_fx.prepare_fx(model, torch.ao.quantization.get_default_qconfig_mapping("x86"), (x_t,))
        prepared(x_t)
        observers = list({id(m): m for n, m in prepared._modules.items() if n.startswith("activation_post")}.values())
        reference = _np(quantize_fx.convert_to_reference_fx(copy.deepcopy(prepared))(x_t))
        converted = quantize_fx.convert_fx(prepared)
        int8 = {"calibration": (x_t, _np(converted(x_t))), "fresh": (fresh, _np(converted(fresh)))}
    # torch: x, conv1 (shared by the pool and the ReLU), conv2 (shared by the flatten), fc
    assert len(observers) == 4
    w = lambda conv: _np(conv.weight).transpose(2, 3, 1, 0)  # noqa: E731  OIHW -> HWIO
    params = {"w1": w(model.conv1), "b1": _np(model.conv1.bias), "w2": w(model.conv2), "b2": _np(model.conv2.bias),
              "wf": _np(model.fc.weight).T, "bf": _np(model.fc.bias)}
    x = jnp.asarray(_np(x_t).transpose(0, 2, 3, 1))
    qf = jquant.quantize(jax_net, jquant.presets.torch_x86())
    qstate = qf.init(params, x)
    conv1, conv2, fc = qf.sites
    views = [v for v in qf.plan(params, x).by_eqn.values() if isinstance(v, View)]
    assert ("relu", conv1.name) in {(v.primitive, v.name) for v in views}
    assert conv2.operands[0].spec.site == conv1.name  # no observer of its own on the ReLU output
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")
    slots = [qstate[conv1.name]["input"], qstate[conv1.name]["output"], qstate[conv2.name]["output"],
             qstate[fc.name]["output"]]
    assert_slots_hold_fx_qparams(slots, observers)
    step = float(qstate[fc.name]["output"].scale)
    int_fn, int_params = assert_eval_and_convert_match_fx(qf, qstate, params, x, reference, int8, step)
    # The ReLU runs on the pooled integers: max(q, zero point) on the u8 values, no float ReLU left.
    hlo = str(jax.make_jaxpr(int_fn)(int_params, x))
    assert "max" in hlo and not [line for line in hlo.splitlines() if "max" in line and "f32[8,4,4,8]" in line]
