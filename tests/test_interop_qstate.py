"""Torch QAT qparams -> jquant qstate -> torch: the jquant fake-quant model reproduces torch's logits."""

import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
from torch.ao import quantization as tq  # noqa: E402

from interop import (  # noqa: E402
    InteropError,
    export_qparams,
    format_links,
    import_qparams,
    link_sites,
    spec_from_record,
    torch_to_flax,
    unlinked_records,
)
from jquant.transform import Rule, quantize  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


class TorchMLP(tnn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.fc1 = tnn.Linear(16, 32)
        self.relu = tnn.ReLU()
        self.fc2 = tnn.Linear(32, 10)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.fc2(self.relu(self.fc1(self.quant(x)))))


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10, name="fc2")(nn.relu(nn.Dense(32, name="fc1")(x)))


def _trained_qat(seed=0):
    torch.manual_seed(seed)
    m = TorchMLP()
    m.qconfig = tq.get_default_qat_qconfig("x86")
    m.train()
    tq.prepare_qat(m, inplace=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(5):
        x = torch.randn(32, 16)
        loss = (m(x) - x[:, :10]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.apply(tq.disable_observer)
    m.eval()
    return m


def _jquant_model(table, x):
    fm = FlaxMLP()
    template = fm.init(jax.random.key(0), x)
    # the jquant specs must match torch's: int8 per-channel weights, quint8 0..127 activations (x86)
    config = [Rule(weight=spec_from_record(table["fc1"]["weight"]), inputs=spec_from_record(table["quant"]["output"]))]
    qf = quantize(lambda p, x: fm.apply(p, x), config)
    return fm, template, qf


def test_imported_qstate_reproduces_torch_fake_quant_logits():
    tm = _trained_qat()
    state = tm.state_dict()
    table = import_qparams(state, model=tm)
    x = torch.randn(64, 16)
    _, template, qf = _jquant_model(table, x.numpy())
    params = torch_to_flax(
        {k: v for k, v in state.items() if k.endswith(("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))}, template
    )
    qstate0 = qf.init(params, x.numpy())
    links = link_sites(table, qf.sites, qstate=qstate0)
    text = format_links(links, table)
    rows = {(lk.torch_module, lk.torch_role): (lk.site.split("/")[-2], lk.key, lk.how) for lk in links}
    assert rows == {
        ("fc1", "weight"): ("fc1", "weight", "name"),
        ("quant", "output"): ("fc1", "input", "graph"),
        ("fc2", "weight"): ("fc2", "weight", "name"),
        ("fc1", "output"): ("fc2", "input", "graph"),
    }
    assert unlinked_records(table, links) == [("fc2", "output")] and "not linked: fc2 (output)" in text
    qstate = import_qparams(state, model=tm, qstate=qstate0, sites=qf.sites)
    out, _ = qf.apply(qstate, params, x.numpy(), mode="eval")
    # jquant has no site for torch's final output fake quant (fc2 output incl. bias): compare before it
    tm.fc2.activation_post_process.disable_fake_quant()
    expected = tm(x).detach().numpy()
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    # without the imported qparams the outputs are far off (the test can fail)
    fresh_out, _ = qf.apply(qstate0, params, x.numpy(), mode="eval")
    assert np.abs(np.asarray(fresh_out) - expected).max() > 1e-2


class TorchCNN(tnn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = tnn.Conv2d(1, 6, 3)
        self.conv2 = tnn.Conv2d(6, 8, 4, groups=2)
        self.fc = tnn.Linear(8, 5)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        x = torch.relu(self.conv1(self.quant(x)))
        x = torch.relu(self.conv2(x))  # 1x1 spatial: flatten order is the same in NCHW and NHWC
        return self.dequant(self.fc(x.flatten(1)))


class FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), padding="VALID", name="conv1")(x))
        x = nn.relu(nn.Conv(8, (4, 4), padding="VALID", feature_group_count=2, name="conv2")(x))
        return nn.Dense(5, name="fc")(x.reshape(x.shape[0], -1))


def test_cnn_qat_logits_match_torch():
    torch.manual_seed(0)
    tm = TorchCNN()
    tm.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(tm.train(), inplace=True)
    for _ in range(3):
        tm(torch.randn(16, 1, 6, 6))
    tm.apply(tq.disable_observer)
    tm.eval()
    tm.fc.activation_post_process.disable_fake_quant()
    state = tm.state_dict()
    table = import_qparams(state, model=tm)
    x = torch.randn(32, 1, 6, 6)
    x_nhwc = x.numpy().transpose(0, 2, 3, 1)
    fm = FlaxCNN()
    floats = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in ("weight", "bias") and "quant" not in k}
    params = torch_to_flax(floats, fm.init(jax.random.key(0), x_nhwc))
    config = [
        Rule(weight=spec_from_record(table["conv1"]["weight"]), inputs=spec_from_record(table["quant"]["output"]))
    ]
    qf = quantize(lambda p, x: fm.apply(p, x), config)
    qstate = import_qparams(state, model=tm, qstate=qf.init(params, x_nhwc), sites=qf.sites)
    out, _ = qf.apply(qstate, params, x_nhwc, mode="eval")
    np.testing.assert_allclose(np.asarray(out), tm(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_qstate_export_round_trip_is_exact():
    tm = _trained_qat()
    state = tm.state_dict()
    table = import_qparams(state, model=tm)
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    _, template, qf = _jquant_model(table, x)
    params = torch_to_flax(
        {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] in ("weight", "bias") and "fake" not in k}, template
    )
    qstate0 = qf.init(params, x)
    links = link_sites(table, qf.sites, qstate=qstate0)
    qstate = import_qparams(state, model=tm, qstate=qstate0, sites=qf.sites, links=links)
    fresh = TorchMLP()
    fresh.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(fresh.train(), inplace=True)
    exported = export_qparams(qstate, fresh, sites=qf.sites, links=links)
    fresh.load_state_dict(exported, strict=True)
    for mod, role in [("fc1", "weight"), ("fc2", "weight"), ("quant", "output"), ("fc1", "output")]:
        prefix = f"{mod}.weight_fake_quant" if role == "weight" else f"{mod}.activation_post_process"
        for leaf in ("scale", "zero_point", "activation_post_process.min_val", "activation_post_process.max_val"):
            key = f"{prefix}.{leaf}"
            assert exported[key].dtype == state[key].dtype and torch.equal(exported[key], state[key]), key


def test_range_mismatch_is_reported():
    tm = _trained_qat()
    fm = FlaxMLP()
    x = np.zeros((2, 16), np.float32)
    params = fm.init(jax.random.key(0), x)
    qf = quantize(lambda p, x: fm.apply(p, x), None)  # jquant's default int8 activations, not torch's quint8
    with pytest.raises(InteropError, match=r"range \(-128, 127\) but torch quant \(output\) is uint8 \(0, 127\)"):
        import_qparams(tm.state_dict(), model=tm, qstate=qf.init(params, x), sites=qf.sites)
