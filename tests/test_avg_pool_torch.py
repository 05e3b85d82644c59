"""Average pooling and means on quantized values against torch: the integer kernel bit for bit against torch's
quantized ``avg_pool2d`` / ``mean``, and ``torch_x86()`` on a CNN with average pools and a global mean against
torch FX (observer sharing, reference model, ``convert_fx``)."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fx_oracle import assert_eval_and_convert_match_fx, assert_slots_hold_fx_qparams, distinct_observers, fx_x86
from jax import lax

import jquant
from jquant.kernels.pooling import quantized_average

torch = pytest.importorskip("torch")
quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")


def _np(t):
    return t.detach().numpy().astype(np.float32)


def _quantized(shape, zero_point, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    low, high = (0, 256) if dtype == torch.quint8 else (-128, 128)
    raw = torch.randint(low, high, shape, generator=gen, dtype=torch.int32)
    raw = raw.to(torch.uint8 if dtype == torch.quint8 else torch.int8)
    return torch._make_per_tensor_quantized_tensor(raw, 0.1, zero_point), raw.numpy()


@pytest.mark.parametrize("dtype", ["quint8", "qint8"])
@pytest.mark.parametrize(
    "window, stride, padding, count_include_pad",
    [(2, 2, 0, True), (3, 2, 1, True), (3, 2, 1, False), (3, 1, 1, False), (2, 3, 1, False), (4, 4, 0, True)],
)
def test_quantized_avg_pool_is_torch_bit_for_bit(dtype, window, stride, padding, count_include_pad):
    """Divisors 4 / 6 / 9 / 16 and zero points whose ties the float rounding decides (6 is where an FMA would
    round differently: 0.01% of all sums). Compiled, as a converted function runs it (XLA may contract)."""
    pads = ((padding, padding), (padding, padding))
    jaxpr = jax.make_jaxpr(lambda v: nn.avg_pool(v, (window, window), (stride, stride), pads,
                                                 count_include_pad=count_include_pad))(jnp.ones((4, 12, 12, 8)))
    sum_eqn, div_eqn = jaxpr.eqns[0], jaxpr.eqns[-1]
    assert (sum_eqn.primitive.name, div_eqn.primitive.name) == ("reduce_window_sum", "div")
    # count_include_pad=False divides by the per-position counts (what the traced function computes too).
    counts = lax.reduce_window(jnp.ones((1, 12, 12, 1)), 0.0, lax.add, (1, window, window, 1),
                               (1, stride, stride, 1), ((0, 0),) + pads + ((0, 0),))
    divisor = float(window * window) if count_include_pad else counts
    average = jax.jit(functools.partial(quantized_average, primitive="reduce_window_sum", params=sum_eqn.params))
    for zero_point in ((0, 3, 128, 77) if dtype == "quint8" else (0, -5, 40)):
        x, raw = _quantized((4, 8, 12, 12), zero_point, getattr(torch, dtype), seed=zero_point + 7)
        want = torch.nn.functional.avg_pool2d(x, window, stride, padding, count_include_pad=count_include_pad)
        got = average(jnp.asarray(raw.transpose(0, 2, 3, 1)), zero_point, divisor)
        np.testing.assert_array_equal(np.asarray(got), want.int_repr().numpy().transpose(0, 2, 3, 1),
                                      err_msg=f"zero point {zero_point}")


@pytest.mark.parametrize("size", [5, 6, 7, 14])
def test_quantized_mean_is_torch_bit_for_bit(size):
    average = jax.jit(functools.partial(quantized_average, primitive="reduce_sum", params={"axes": (1, 2)}))
    for zero_point in (0, 3, 128):
        x, raw = _quantized((16, 32, size, size), zero_point, torch.quint8, seed=size + zero_point)
        want = torch.mean(x, (2, 3)).int_repr().numpy()
        got = average(jnp.asarray(raw.transpose(0, 2, 3, 1)), zero_point, float(size * size))
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"zero point {zero_point}")


class TorchPoolNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.pool1 = torch.nn.AvgPool2d(3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.pool2 = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.fc = torch.nn.Linear(8, 5)
        self.relu1, self.relu2 = torch.nn.ReLU(), torch.nn.ReLU()

    def forward(self, x):
        a = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        b = self.pool2(self.relu2(self.conv2(a)))
        return self.fc(b.mean((2, 3)))


class LinenPoolNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        # Named as the torch modules, so that interop links weights by name.
        bn = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn1")
        a = nn.relu(bn(nn.Conv(8, (3, 3), padding=1, name="conv1")(x)))
        a = nn.avg_pool(a, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        b = nn.relu(nn.Conv(8, (3, 3), padding=1, name="conv2")(a))
        b = nn.avg_pool(b, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)
        return nn.Dense(5, name="fc")(jnp.mean(b, axis=(1, 2)))


def _window_sum(x, window, stride):
    return lax.reduce_window(x, 0.0, lax.add, (1, window, window, 1), (1, stride, stride, 1),
                             ((0, 0), (1, 1), (1, 1), (0, 0)))


def jnp_pool_net(p, x):
    conv = lambda v, w: lax.conv_general_dilated(v, w, (1, 1), "SAME",  # noqa: E731
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = conv(x, p["w1"]) + p["b1"]
    a = jax.nn.relu((y - p["mean"]) * p["gamma"] / jnp.sqrt(p["var"] + 1e-5) + p["beta"])
    a = _window_sum(a, 3, 2) / 9.0
    b = jax.nn.relu(conv(a, p["w2"]) + p["b2"])
    b = _window_sum(b, 3, 1) / _window_sum(jnp.ones((1,) + b.shape[1:3] + (1,)), 3, 1)
    return b.sum(axis=(1, 2)) / (b.shape[1] * b.shape[2]) @ p["wf"] + p["bf"]


@pytest.fixture(scope="module")
def pool_oracle():
    torch.manual_seed(3)
    model = TorchPoolNet().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.2, 0.2)
    x = torch.randn(8, 3, 10, 10)
    fresh = torch.randn(8, 3, 10, 10) * 1.5  # the calibration batch size: no recompilation
    prepared, reference_model, converted = fx_x86(model, x)
    int8 = {"calibration": (x, _np(converted(x))), "fresh": (fresh, _np(converted(fresh)))}
    torch_models = {"reference": reference_model, "convert_fx": converted}
    return model, x, distinct_observers(prepared), _np(reference_model(x)), int8, torch_models


def _params(model, variant):
    w = lambda conv: _np(conv.weight).transpose(2, 3, 1, 0)  # noqa: E731  OIHW -> HWIO
    bn = model.bn1
    if variant == "jnp":
        return jnp_pool_net, {
            "w1": w(model.conv1), "b1": _np(model.conv1.bias), "w2": w(model.conv2), "b2": _np(model.conv2.bias),
            "mean": _np(bn.running_mean), "var": _np(bn.running_var), "gamma": _np(bn.weight),
            "beta": _np(bn.bias), "wf": _np(model.fc.weight).T, "bf": _np(model.fc.bias),
        }
    variables = {
        "params": {
            "conv1": {"kernel": w(model.conv1), "bias": _np(model.conv1.bias)},
            "bn1": {"scale": _np(bn.weight), "bias": _np(bn.bias)},
            "conv2": {"kernel": w(model.conv2), "bias": _np(model.conv2.bias)},
            "fc": {"kernel": _np(model.fc.weight).T, "bias": _np(model.fc.bias)},
        },
        "batch_stats": {"bn1": {"mean": _np(bn.running_mean), "var": _np(bn.running_var)}},
    }
    return LinenPoolNet().apply, variables


@pytest.mark.parametrize("variant", ["linen", "jnp"])
def test_torch_x86_average_pools_share_qparams_and_convert_as_fx(pool_oracle, variant):
    model, x_t, observers, reference, int8, _ = pool_oracle
    fn, params = _params(model, variant)
    x = jnp.asarray(_np(x_t).transpose(0, 2, 3, 1))
    qf = jquant.quantize(fn, jquant.presets.torch_x86())
    qstate = qf.init(params, x)
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")
    conv1, conv2, fc = qf.sites
    # FX: x (0), conv1-relu shared with pool1 (1), conv2-relu shared with pool2 and mean (2), fc (3); the next op's
    # input reuses those qparams, so there is no other activation observer.
    assert conv2.operands[0].spec.site == conv1.name and fc.operands[0].spec.site == conv2.name
    slots = [qstate[conv1.name]["input"], qstate[conv1.name]["output"], qstate[conv2.name]["output"],
             qstate[fc.name]["output"]]
    assert_slots_hold_fx_qparams(slots, observers)
    step = float(qstate[fc.name]["output"].scale)
    int_fn, int_params = assert_eval_and_convert_match_fx(qf, qstate, params, x, reference, int8, step)
    if variant != "linen":
        return
    # The pools run on integers: every reduce-window in the compiled program sums 8-bit values in int32, none
    # sums floats.
    hlo = jax.jit(int_fn).lower(int_params, x).compile().as_text()
    windows = re.findall(r"= (\w+)\[[\d,]*\]\{[\d,]*\} reduce-window\(", hlo)
    assert windows and set(windows) <= {"s32"}, windows


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
@pytest.mark.parametrize("form", ["reference", "convert_fx"])
def test_imported_qparams_link_through_average_pools(pool_oracle, form):
    """``interop.import_qparams`` follows the torch graph through avg_pool2d and mean (torch runs them with their
    input's qparams): the next conv / linear reads the previous conv's output qparams, and ``eval`` equals torch's
    reference model."""
    from interop import import_qparams, link_sites

    model, x_t, _, reference, _, torch_models = pool_oracle
    torch_model = torch_models[form]
    fn, params = _params(model, "linen")
    x = jnp.asarray(_np(x_t).transpose(0, 2, 3, 1))
    qf = jquant.quantize(fn, jquant.presets.torch_x86())
    qstate0 = qf.init(params, x)
    state_dict = torch_model.state_dict()
    links = link_sites(import_qparams(state_dict, model=torch_model), qf.sites, qstate=qstate0)
    rows = {(link.site.split("/")[1], link.key): (link.torch_module, link.torch_role) for link in links}
    w = "weight"
    fused = {"conv1": "conv1.0", "conv2": "conv2.0"} if form == "reference" else {}  # the reference ConvReLU
    assert rows == {("conv1", "input"): ("conv1", "input"), ("conv1", "output"): ("conv1", "output"),
                    ("conv2", "output"): ("conv2", "output"), ("fc", "output"): ("fc", "output"),
                    **{(m, w): (fused.get(m, m), w) for m in ("conv1", "conv2", "fc")}}
    qstate = import_qparams(state_dict, model=torch_model, qstate=qstate0, sites=qf.sites)
    fc = qf.sites[-1]
    out, _ = qf.apply(qstate, params, x, mode="eval")
    step = float(qstate[fc.name]["output"].scale)
    error = np.abs(np.asarray(out) - reference)
    assert error.max() <= step * 1.001 and (error <= 1e-5).mean() >= 0.99, error.max() / step


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_input_observers_link_through_average_pools_of_a_converted_model(pool_oracle):
    """A config with an input observer per conv / linear (no sharing): each input links to the torch record that
    quantized the value before the pool / mean (in ``convert_fx``'s graph the pools have no qparams of their own)."""
    from interop import import_qparams, link_sites
    from jquant.transform.quantizer import RuleQuantizer
    from jquant.transform.specs import QuantizationSpec, Rule

    model, x_t, *_, torch_models = pool_oracle
    converted = torch_models["convert_fx"]
    fn, params = _params(model, "linen")
    rule = Rule(weight=QuantizationSpec("int8", "per_channel_symmetric"), inputs=QuantizationSpec("uint8"))
    qf = jquant.quantize(fn, RuleQuantizer([rule], fold_batchnorm=True))
    x = jnp.asarray(_np(x_t).transpose(0, 2, 3, 1))
    qstate0 = qf.init(params, x)
    links = link_sites(import_qparams(converted.state_dict(), model=converted), qf.sites, qstate=qstate0)
    rows = {(link.site.split("/")[1], link.key): (link.torch_module, link.torch_role) for link in links}
    assert rows[("conv2", "input")] == ("conv1", "output") and rows[("fc", "input")] == ("conv2", "output"), rows
