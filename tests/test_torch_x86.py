"""jquant.presets.torch_x86() against torch FX (prepare_fx / convert_to_reference_fx, x86 qconfig mapping).

One residual CNN (conv-bn-relu, conv-bn, add-relu, 1x1 conv, cat, max-pool, flatten, linear) written in torch,
Flax linen, Flax nnx and plain jax.numpy with the same weights, calibrated on the same batch: every observer holds
torch's range and qparams, and ``mode="eval"`` equals torch's reference model.
"""

import contextlib
import copy
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import jquant

torch = pytest.importorskip("torch")
quantize_fx = pytest.importorskip("torch.ao.quantization.quantize_fx")


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.relu2 = torch.nn.ReLU()
        self.conv3 = torch.nn.Conv2d(8, 4, 1)
        self.fc = torch.nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        a = self.relu1(self.bn1(self.conv1(x)))
        r = self.relu2(self.bn2(self.conv2(a)) + a)
        y = torch.cat([r, self.conv3(r)], 1)
        y = torch.flatten(torch.nn.functional.max_pool2d(y, 2), 1)
        return self.fc(y)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        bn = dict(use_running_average=True, epsilon=1e-5)
        a = nn.relu(nn.BatchNorm(**bn)(nn.Conv(8, (3, 3), padding=1)(x)))
        r = nn.relu(nn.BatchNorm(**bn)(nn.Conv(8, (3, 3), padding=1)(a)) + a)
        y = jnp.concatenate([r, nn.Conv(4, (1, 1))(r)], -1)
        y = nn.max_pool(y, (2, 2), (2, 2))
        y = y.transpose(0, 3, 1, 2).reshape(y.shape[0], -1)  # torch's NCHW flatten order
        return nn.Dense(10)(y)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        bn = dict(use_running_average=True, epsilon=1e-5, rngs=rngs)
        self.conv1, self.bn1 = nnx.Conv(3, 8, (3, 3), padding=1, rngs=rngs), nnx.BatchNorm(8, **bn)
        self.conv2, self.bn2 = nnx.Conv(8, 8, (3, 3), padding=1, rngs=rngs), nnx.BatchNorm(8, **bn)
        self.conv3 = nnx.Conv(8, 4, (1, 1), rngs=rngs)
        self.fc = nnx.Linear(192, 10, rngs=rngs)

    def __call__(self, x):
        a = nnx.relu(self.bn1(self.conv1(x)))
        r = nnx.relu(self.bn2(self.conv2(a)) + a)
        y = nn.max_pool(jnp.concatenate([r, self.conv3(r)], -1), (2, 2), (2, 2))
        return self.fc(y.transpose(0, 3, 1, 2).reshape(y.shape[0], -1))


def _nnx(model):
    v = _linen_variables(model)
    p, s = v["params"], v["batch_stats"]
    net = NnxNet(nnx.Rngs(0))
    for mine, theirs in (("conv1", "Conv_0"), ("conv2", "Conv_1"), ("conv3", "Conv_2"), ("fc", "Dense_0")):
        getattr(net, mine).kernel.set_value(p[theirs]["kernel"])
        getattr(net, mine).bias.set_value(p[theirs]["bias"])
    for mine, theirs in (("bn1", "BatchNorm_0"), ("bn2", "BatchNorm_1")):
        bn = getattr(net, mine)
        for name, value in (("scale", p[theirs]["scale"]), ("bias", p[theirs]["bias"]),
                            ("mean", s[theirs]["mean"]), ("var", s[theirs]["var"])):
            getattr(bn, name).set_value(value)
    graphdef, state = nnx.split(net)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    return apply, state


def _conv(x, w, b):
    y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b


def _bn(y, p):
    return (y - p["mean"]) * p["gamma"] / jnp.sqrt(p["var"] + 1e-5) + p["beta"]


def jnp_net(p, x):
    a = jax.nn.relu(_bn(_conv(x, p["w1"], p["b1"]), p["bn1"]))
    r = jax.nn.relu(_bn(_conv(a, p["w2"], p["b2"]), p["bn2"]) + a)
    y = jnp.concatenate([r, _conv(r, p["w3"], p["b3"])], -1)
    y = lax.reduce_window(y, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    y = y.transpose(0, 3, 1, 2).reshape(y.shape[0], -1)
    return y @ p["wf"] + p["bf"]


def _np(t):
    return t.detach().numpy().astype(np.float32)


@pytest.fixture(scope="module")
def oracle():
    torch.manual_seed(0)
    model = TorchNet().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):  # non-trivial running stats, so the fold matters
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapping = torch.ao.quantization.get_default_qconfig_mapping("x86")
        prepared = quantize_fx.prepare_fx(model, mapping, (x,))
        prepared(x)
        reference = quantize_fx.convert_to_reference_fx(prepared)
        expected = _np(reference(x))
    observers = {name: m for name, m in prepared._modules.items() if name.startswith("activation_post_process")}
    return model, x, observers, reference, expected


def _linen_variables(model):
    def conv(m):
        return {"kernel": jnp.asarray(_np(m.weight).transpose(2, 3, 1, 0)), "bias": jnp.asarray(_np(m.bias))}

    def bn(m):
        return {"scale": jnp.asarray(_np(m.weight)), "bias": jnp.asarray(_np(m.bias))}, {
            "mean": jnp.asarray(_np(m.running_mean)), "var": jnp.asarray(_np(m.running_var))}

    (bn0, st0), (bn1, st1) = bn(model.bn1), bn(model.bn2)
    params = {
        "Conv_0": conv(model.conv1), "BatchNorm_0": bn0, "Conv_1": conv(model.conv2), "BatchNorm_1": bn1,
        "Conv_2": conv(model.conv3),
        "Dense_0": {"kernel": jnp.asarray(_np(model.fc.weight).T), "bias": jnp.asarray(_np(model.fc.bias))},
    }
    return {"params": params, "batch_stats": {"BatchNorm_0": st0, "BatchNorm_1": st1}}


def _jnp_params(model):
    v = _linen_variables(model)
    p, s = v["params"], v["batch_stats"]

    def bn(i):
        return {"gamma": p[f"BatchNorm_{i}"]["scale"], "beta": p[f"BatchNorm_{i}"]["bias"],
                "mean": s[f"BatchNorm_{i}"]["mean"], "var": s[f"BatchNorm_{i}"]["var"]}

    return {
        "w1": p["Conv_0"]["kernel"], "b1": p["Conv_0"]["bias"], "bn1": bn(0),
        "w2": p["Conv_1"]["kernel"], "b2": p["Conv_1"]["bias"], "bn2": bn(1),
        "w3": p["Conv_2"]["kernel"], "b3": p["Conv_2"]["bias"],
        "wf": p["Dense_0"]["kernel"], "bf": p["Dense_0"]["bias"],
    }


def _variants(model, variant):
    return {
        "linen": lambda: (LinenNet().apply, _linen_variables(model)),
        "jnp": lambda: (jnp_net, _jnp_params(model)),
        "nnx": lambda: _nnx(model),
    }[variant]()


@pytest.fixture(scope="module")
def calibrated(oracle):
    """``variant -> (qf, qstate, params, x)``, each calibrated once on the oracle's batch."""
    model, x_t, *_ = oracle
    x = jnp.asarray(_np(x_t).transpose(0, 2, 3, 1))
    cache = {}

    def get(variant):
        if variant not in cache:
            fn, params = _variants(model, variant)
            qf = jquant.quantize(fn, jquant.presets.torch_x86())
            qstate = qf.init(params, x)
            _, qstate = qf.apply(qstate, params, x, mode="calibrate")
            cache[variant] = qf, qstate, params, x
        return cache[variant]

    return get


def _slot(qf, qstate, primitive, index, key):
    sites = [s for s in qf.sites if s.primitive == primitive]
    return qstate[sites[index].name][key]


@pytest.mark.parametrize("variant", ["linen", "nnx", "jnp"])
def test_torch_x86_places_observers_as_fx_and_holds_its_ranges(oracle, calibrated, variant):
    _, _, observers, reference, _ = oracle
    qf, qstate, _, _ = calibrated(variant)
    convs = [s for s in qf.sites if s.primitive == "conv_general_dilated"]
    assert [s.fused for s in convs] == [("add", "relu"), ("add",), ()]  # conv3 feeds cat: no observer of its own
    assert convs[2].output_spec is None
    add = next(s for s in qf.sites if s.primitive == "add")
    assert add.fused == ("relu",)
    # FX: x, conv1 (bn folded, relu fused), conv2 (bn folded), add-relu (shared by conv3, cat, max-pool, flatten), fc
    pairs = {
        "activation_post_process_0": _slot(qf, qstate, "conv_general_dilated", 0, "input"),
        "activation_post_process_1": _slot(qf, qstate, "conv_general_dilated", 0, "output"),
        "activation_post_process_2": _slot(qf, qstate, "conv_general_dilated", 1, "output"),
        "activation_post_process_3": _slot(qf, qstate, "add", 0, "output"),
        "activation_post_process_8": _slot(qf, qstate, "dot_general", 0, "output"),
    }
    assert len({id(observers[f"activation_post_process_{i}"]) for i in range(3, 8)}) == 1
    slots = sum(len([k for k in site if k != "weight"]) for site in qstate.values())
    assert slots == len(pairs)  # no other activation observer anywhere
    for name, slot in pairs.items():
        # The graph input is observed bit for bit; later tensors come out of XLA's conv / dot instead of torch's,
        # whose float rounding differs by an ulp here and there: ranges agree to float rounding.
        obs = observers[name]
        exact = name == "activation_post_process_0"
        got = np.float32([slot.observer.min_val, slot.observer.max_val])
        want = np.float32([obs.min_val.item(), obs.max_val.item()])
        np.testing.assert_allclose(got, want, rtol=0 if exact else 1e-6, atol=0, err_msg=name)
        moved = np.abs(np.asarray(slot.observer.histogram) - obs.histogram.numpy()).sum()
        assert moved == 0 if exact else moved <= 4, (name, moved)
        scale, zero_point = obs.calculate_qparams()
        assert int(slot.zero_point) == zero_point.item(), name
        # The histogram's range search, compiled inside the quantized function, can land one float32 ulp off
        # torch's scale (eagerly it is exact: reported to the observers' owner).
        np.testing.assert_allclose(np.float32(slot.scale), np.float32(scale.item()), rtol=1e-6, err_msg=name)
    # Weights: per-channel symmetric qint8 on the BN-folded kernel, bit-exact with the reference model's.
    for site, module in zip(convs + [next(s for s in qf.sites if s.primitive == "dot_general")],
                            ("conv1", "conv2", "conv3", "fc"), strict=True):
        got = np.asarray(qstate[site.name]["weight"].scale)
        ref = getattr(reference, module)
        ref = ref[0] if isinstance(ref, torch.nn.Sequential) else ref  # fused ConvReLU2d: the conv inside
        want = ref.weight_scale.numpy().astype(np.float32)
        np.testing.assert_array_equal(got, want, err_msg=module)


@pytest.mark.parametrize("variant", ["linen", "nnx", "jnp"])
def test_torch_x86_eval_matches_the_reference_model(oracle, calibrated, variant):
    expected = oracle[-1]
    qf, qstate, params, x = calibrated(variant)
    out, _ = qf.apply(qstate, params, x, mode="eval")
    step = float(_slot(qf, qstate, "dot_general", 0, "output").scale)
    error = np.abs(np.asarray(out) - expected)
    assert error.max() <= step * 1.001, (error.max(), step)  # at most one output step (a tie)
    assert (error <= 1e-5).mean() >= 0.99, error


def test_torch_x86_qat_mirrors_the_default_qat_mapping():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).train()
    x_t = torch.randn(16, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapping = torch.ao.quantization.get_default_qat_qconfig_mapping("x86")
        prepared = quantize_fx.prepare_qat_fx(model, mapping, (x_t,))
        prepared(x_t)
    fq = {n: m for n, m in prepared._modules.items() if n.startswith("activation_post_process")}
    assert len(fq) == 3  # input, fused linear-relu output, linear output

    def fn(p, x):
        return jax.nn.relu(x @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"]

    params = {"w0": _np(model[0].weight).T, "b0": _np(model[0].bias), "w1": _np(model[2].weight).T,
              "b1": _np(model[2].bias)}
    x = jnp.asarray(_np(x_t))
    qf = jquant.quantize(fn, jquant.presets.torch_x86(qat=True))
    qstate = qf.init(params, x)
    _, qstate = qf.apply(qstate, params, x, mode="qat")
    first, second = (s.name for s in qf.sites)
    assert [s.fused for s in qf.sites] == [("add", "relu"), ("add",)]
    assert type(qstate[first]["weight"].observer).__name__ == "MinMaxState"
    slots = [qstate[first]["input"], qstate[first]["output"], qstate[second]["output"]]
    for name, slot in zip(sorted(fq), slots, strict=True):
        obs = fq[name].activation_post_process
        assert type(obs).__name__ == "MovingAverageMinMaxObserver" and obs.reduce_range
        # The first batch sets the range; downstream tensors saw torch's (C++-chosen) fake-quant qparams,
        # jquant's observer-derived ones: equal ranges up to those qparams' rounding.
        got = [float(slot.observer.min_val), float(slot.observer.max_val)]
        np.testing.assert_allclose(got, [obs.min_val.item(), obs.max_val.item()], rtol=2e-2, atol=2e-2,
                                   err_msg=name)


# -- the converted integer function against torch's convert_fx (x86) ----------------------------------------------


@pytest.fixture(scope="module")
def fx_int8(oracle):
    """torch's integer model (``convert_fx``, x86 backend) calibrated on the oracle batch, and its output on the
    oracle batch plus 64 new inputs (some outside the calibrated ranges: clamped alike on both sides)."""
    model, x_t, *_ = oracle
    torch.manual_seed(5)
    fresh = torch.randn(64, 3, 8, 8) * 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_fx.prepare_fx(copy.deepcopy(model), torch.ao.quantization.get_default_qconfig_mapping(
            "x86"), (x_t,))
        prepared(x_t)
        quantized = quantize_fx.convert_fx(prepared)
        return {"calibration": (x_t, _np(quantized(x_t))), "fresh": (fresh, _np(quantized(fresh)))}


@pytest.mark.parametrize("variant", ["linen", "nnx", "jnp"])
def test_torch_x86_convert_matches_convert_fx(fx_int8, calibrated, variant):
    qf, qstate, params, x_cal = calibrated(variant)
    int_fn, int_params = jquant.convert(qf, qstate, params, x_cal)
    step = float(_slot(qf, qstate, "dot_general", 0, "output").scale)
    for batch in ("calibration", "fresh"):
        x_t, expected = fx_int8[batch]
        got = np.asarray(int_fn(int_params, jnp.asarray(_np(x_t).transpose(0, 2, 3, 1))))
        error = np.abs(got - expected)
        # Both sides requantize every op's output to uint8; float rounding of the rescale can move a value by one
        # step at a tie, which the next ops may carry: at most one output step on >= 99.9% of the elements.
        assert (error <= step * 1.001).mean() >= 0.999, (batch, error.max() / step, (error > step * 1.001).mean())
        assert error.max() <= 3 * step * 1.001, batch


def _hlo_ops(compiled_text: str, opcode: str, shape: str) -> list[str]:
    """Element types of every ``opcode`` instruction with result ``shape`` of a compiled HLO module (fused
    computations included)."""
    return re.findall(rf"= (\w+)\[{shape}\](?:\{{[^}}]*\}})? {opcode}\(", compiled_text)


def test_converted_program_keeps_8bit_values_between_quantized_ops(calibrated):
    """convert_fx's graph keeps activations quint8 between quantized ops: so does the compiled int function.
    The concatenate and the max-pool (shared observers) run on 8-bit integers; in eval mode they are float32."""
    qf, qstate, params, x = calibrated("linen")
    int_fn, int_params = jquant.convert(qf, qstate, params, x)
    compiled = jax.jit(int_fn).lower(int_params, x).compile().as_text()
    pool, cat = "4,4,4,12", "4,8,8,12"  # the max-pool's output and the residual branch's cat (NHWC)
    assert _hlo_ops(compiled, "reduce-window", pool) == ["u8"]
    assert _hlo_ops(compiled, "concatenate", cat) in ([], ["u8"])  # XLA may fuse the cat into its consumer
    assert "u8[4,8,8,12]" in compiled  # ... then the fusion computing it writes uint8
    eval_hlo = jax.jit(lambda s, p, x: qf.apply(s, p, x, mode="eval")[0]).lower(qstate, params, x).compile()
    assert _hlo_ops(eval_hlo.as_text(), "reduce-window", pool) == ["f32"]


def _mlp(p, x):
    h = jax.nn.relu(x @ p["w0"] + p["b0"])
    h = jax.nn.relu(h @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


@pytest.mark.parametrize("kernels", ["default", "xla"])
@pytest.mark.parametrize("rows", [8, 256])
def test_fused_linear_relu_requantizes_in_one_kernel_call(kernels, rows):
    """Linear + bias + ReLU (LinearReLU) is one site: the converted function runs the bias, the ReLU and the
    requantization to the next layer's uint8 in the kernel's epilogue, and reads that uint8 directly."""
    rng = np.random.default_rng(0)
    params = {f"w{i}": jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), jnp.float32)
              for i, s in enumerate([(32, 64), (64, 48), (48, 10)])}
    params.update({f"b{i}": jnp.asarray(rng.standard_normal(n) * 0.1, jnp.float32) for i, n in enumerate([64, 48, 10])})
    x = jnp.asarray(rng.standard_normal((rows, 32)), jnp.float32)
    qf = jquant.quantize(_mlp, jquant.presets.torch_x86())
    qstate = qf.init(params, x)
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")
    context = jquant.kernels.native.xla_kernels() if kernels == "xla" else contextlib.nullcontext()
    with context:
        int_fn, int_params = jquant.convert(qf, qstate, params, x)
        got = np.asarray(int_fn(int_params, x))
        compiled = jax.jit(int_fn).lower(int_params, x).compile().as_text()
    want = np.asarray(qf.apply(qstate, params, x, mode="eval")[0])
    step = float(qstate[qf.sites[-1].name]["output"].scale)
    error = np.abs(got - want)
    assert (error <= 1e-5).mean() >= 0.99 and error.max() <= step * 1.001, error.max() / step
    # The hidden activations exist as 8-bit integers (XLA: the epilogue fusion after the int32 dot writes them;
    # where the native GEMM runs, it writes them itself).
    for hidden in (f"{rows},64", f"{rows},48"):
        assert re.search(rf"[us]8\[{hidden}\]", compiled), hidden
        if jquant.kernels.native.use_native_gemm(rows) and kernels == "default":
            assert _hlo_ops(compiled, "custom-call", hidden) == ["u8"], hidden


def test_softmax_between_linears_is_observed_and_converted_as_fx_does():
    """torch's x86 mapping runs softmax in float (dequantize -> softmax -> quantize) with a HistogramObserver on its
    output, not fixed qparams: jquant observes the same tensor (the next dense's input) with the same range, and the
    converted function equals convert_fx's."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.fc2 = torch.nn.Linear(8, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(torch.softmax(self.fc(x), dim=-1))

    torch.manual_seed(0)
    model, x_t = Net().eval(), torch.randn(16, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_fx.prepare_fx(model, torch.ao.quantization.get_default_qconfig_mapping("x86"), (x_t,))
        prepared(x_t)
        observed = prepared.activation_post_process_2
        assert type(observed).__name__ == "HistogramObserver"
        expected = _np(quantize_fx.convert_fx(prepared)(x_t))
    params = {"w": _np(model.fc.weight).T, "b": _np(model.fc.bias), "w2": _np(model.fc2.weight).T,
              "b2": _np(model.fc2.bias)}
    qf = jquant.quantize(lambda p, x: jax.nn.softmax(x @ p["w"] + p["b"], axis=-1) @ p["w2"] + p["b2"],
                         jquant.presets.torch_x86())
    x = jnp.asarray(_np(x_t))
    qstate = qf.init(params, x)
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")
    second = qstate[qf.sites[1].name]["input"]
    np.testing.assert_array_equal(np.float32([second.observer.min_val, second.observer.max_val]),
                                  np.float32([observed.min_val.item(), observed.max_val.item()]))
    int_fn, int_params = jquant.convert(qf, qstate, params, x)
    step = float(qstate[qf.sites[1].name]["output"].scale)
    assert np.abs(np.asarray(int_fn(int_params, x)) - expected).max() <= step * 1.001
