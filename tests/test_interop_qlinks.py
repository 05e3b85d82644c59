"""Torch qparams reach jquant sites by data flow (the torch FX graph), never by registration order.

Oracle: torch FX (``prepare_fx`` / ``convert_fx`` / ``convert_to_reference_fx`` with the x86 qconfig mapping)
on a non-sequential MLP: fc1 -> relu -> fc2 plus a skip x -> fc3, added, concatenated with x -> fc5, then fc4.
Modules are registered in an order that differs from the data flow, so "the nearest module before" is wrong.
"""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
from torch.ao import quantization as tq  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx  # noqa: E402

from interop import InteropError, import_qparams, link_sites, spec_from_record, torch_to_flax  # noqa: E402
from jquant.transform import QuantizationSpec, Rule, quantize  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class TorchSkip(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = tnn.Linear(6, 16)
        self.relu = tnn.ReLU()
        self.fc2 = tnn.Linear(16, 8)
        self.fc3 = tnn.Linear(6, 8)
        self.fc4 = tnn.Linear(12, 4)
        self.fc5 = tnn.Linear(6, 4)  # registered after fc4, used before it

    def forward(self, x):
        y = self.fc2(self.relu(self.fc1(x))) + self.fc3(x)
        return self.fc4(torch.cat([y, self.fc5(x)], 1))


class FlaxSkip(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(8, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x))) + nn.Dense(8, name="fc3")(x)
        return nn.Dense(4, name="fc4")(jnp.concatenate([y, nn.Dense(4, name="fc5")(x)], axis=1))


def _prepared(seed=0):
    torch.manual_seed(seed)
    prepared = prepare_fx(TorchSkip().eval(), tq.get_default_qconfig_mapping("x86"), (torch.randn(2, 6),))
    with torch.no_grad():
        for _ in range(3):
            prepared(torch.randn(64, 6))
    return prepared


def _jquant(table, params_state):
    fm = FlaxSkip()
    x0 = np.zeros((2, 6), np.float32)
    template = fm.init(jax.random.key(0), x0)
    floats = {k: v for k, v in params_state.items() if k.endswith((".weight", ".bias"))}
    floats = {k.replace("fc1.0.", "fc1."): v for k, v in floats.items()}  # FX-fused LinearReLU: fc1.0
    params = torch_to_flax(floats, template)
    weight_rec = next(roles["weight"] for roles in table.values() if "weight" in roles)
    act = QuantizationSpec("uint8", "per_tensor_affine", quant_min=0, quant_max=255)
    qf = quantize(lambda p, x: fm.apply(p, x), [Rule(weight=spec_from_record(weight_rec), inputs=act)])
    return qf, params, x0


def _rows(links):
    return {(lk.site.split("/")[-2], lk.key): (lk.torch_module, lk.torch_role, lk.how) for lk in links}


@pytest.mark.parametrize("form", ["convert_fx", "reference"])
def test_links_follow_the_torch_graph(form):
    prepared = _prepared()
    model = convert_fx(copy.deepcopy(prepared)) if form == "convert_fx" else convert_to_reference_fx(prepared)
    table = import_qparams(model.state_dict(), model=model)
    ref = convert_to_reference_fx(copy.deepcopy(prepared))
    qf, params, x0 = _jquant(table, ref.state_dict())
    qstate0 = qf.init(params, x0)
    links = link_sites(table, qf.sites, qstate=qstate0)
    fc1_w = "fc1" if form == "convert_fx" else "fc1.0"  # the reference LinearReLU keeps its Linear at fc1.0
    cat_out = "_scale_0" if form == "convert_fx" else "_scale_1"  # convert_fx: cat shares the add's qparams
    assert _rows(links) == {
        ("fc1", "weight"): (fc1_w, "weight", "name"),
        ("fc1", "input"): ("fc1", "input", "graph"),  # x's observer (FX names it after its first user)
        ("fc3", "input"): ("fc1", "input", "graph"),  # order-based linking gave fc2's output here
        ("fc5", "input"): ("fc1", "input", "graph"),
        ("fc2", "input"): ("fc1", "output", "graph"),  # after the fused ReLU
        ("fc4", "input"): (cat_out, "output", "graph"),  # the add / cat output observer
        **{(m, "weight"): (m, "weight", "name") for m in ("fc2", "fc3", "fc4", "fc5")},
    }
    assert table["fc1"]["input"].consumers == ("fc1", "fc3", "fc5")


def _drop_quantize(gm, attrs):
    """The reference graph without the quantize/dequantize pairs whose scale is one of ``attrs``."""
    gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and "quantize_per_tensor" in str(node.target) and node.args[1].target in attrs:
            (deq,) = node.users
            deq.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(deq)
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def test_imported_qstate_matches_the_torch_reference_model():
    prepared = _prepared()
    ref = convert_to_reference_fx(prepared)
    table = import_qparams(ref.state_dict(), model=ref)
    qf, params, x0 = _jquant(table, ref.state_dict())
    qstate = import_qparams(ref.state_dict(), model=ref, qstate=qf.init(params, x0), sites=qf.sites)
    x = torch.randn(256, 6) * 1.5
    out, _ = qf.apply(qstate, params, x.numpy(), mode="eval")
    # jquant quantizes dot inputs; torch also quantizes fc2/fc3 outputs before the add and fc4's output: drop those
    expected = _drop_quantize(ref, {"fc2_scale_0", "fc3_scale_0", "fc4_scale_0"})(x).detach().numpy()
    err = np.abs(np.asarray(out) - expected)
    assert (err < 1e-5).mean() >= 0.99 and err.max() < 0.05, (err.max(), (err < 1e-5).mean())
    # registration-order linking (fc3 <- fc2's output, fc4 <- fc5's output) is far off
    wrong = dict(qstate)
    sites = {s.name.split("/")[-2]: s.name for s in qf.sites}
    rec = table["fc2"]["output"]
    wrong[sites["fc3"]] = {**qstate[sites["fc3"]]}
    slot = wrong[sites["fc3"]]["input"]
    wrong[sites["fc3"]]["input"] = slot._replace(
        scale=jnp.asarray(rec.scale, jnp.float32).reshape(slot.scale.shape),
        zero_point=jnp.asarray(rec.zero_point, slot.zero_point.dtype).reshape(slot.zero_point.shape),
    )
    bad, _ = qf.apply(wrong, params, x.numpy(), mode="eval")
    assert np.abs(np.asarray(bad) - expected).max() > 10 * err.max()


class TorchTwo(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = tnn.Linear(6, 8, bias=False)
        self.fc2 = tnn.Linear(8, 4, bias=False)
        self.fc3 = tnn.Linear(6, 8, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x)), self.fc3(x)


class FlaxTwoWrong(nn.Module):
    """fc2 reads fc3's output here; torch's fc2 reads fc1's."""

    @nn.compact
    def __call__(self, x):
        fc1 = nn.Dense(8, use_bias=False, name="fc1")(x)
        return nn.Dense(4, use_bias=False, name="fc2")(nn.Dense(8, use_bias=False, name="fc3")(x)), fc1


def test_a_link_against_jquant_data_flow_is_an_error_naming_both_sides():
    torch.manual_seed(0)
    prepared = prepare_fx(TorchTwo().eval(), tq.get_default_qconfig_mapping("x86"), (torch.randn(2, 6),))
    prepared(torch.randn(32, 6))
    model = convert_fx(prepared)
    table = import_qparams(model.state_dict(), model=model)
    fm = FlaxTwoWrong()
    x0 = np.zeros((2, 6), np.float32)
    params = fm.init(jax.random.key(0), x0)
    act = QuantizationSpec("uint8", "per_tensor_affine", quant_min=0, quant_max=255)
    qf = quantize(lambda p, x: fm.apply(p, x), [Rule(weight=spec_from_record(table["fc1"]["weight"]), inputs=act)])
    with pytest.raises(InteropError, match=r"fc2.*comes straight from site .*fc3.*torch fc1 \(output\).*'fc1'"):
        import_qparams(model.state_dict(), model=model, qstate=qf.init(params, x0), sites=qf.sites)


def test_without_a_graph_links_follow_registration_order_with_a_warning():
    prepared = _prepared()
    ref = convert_to_reference_fx(prepared)
    table = import_qparams(ref.state_dict())  # no model: no graph
    assert table["fc1"]["input"].consumers is None
    qf, params, x0 = _jquant(table, ref.state_dict())
    qstate0 = qf.init(params, x0)
    with pytest.warns(UserWarning, match=r"registration order.*fc3/dot_general/input <- torch fc2 \(output\).*model="):
        links = link_sites(table, qf.sites, qstate=qstate0)
    assert _rows(links)[("fc3", "input")] == ("fc2", "output", "order")  # the guess is wrong here: hence the warning


class EagerSkip(tnn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.fc1 = tnn.Linear(6, 16)
        self.relu = tnn.ReLU()
        self.fc2 = tnn.Linear(16, 8)
        self.fc4 = tnn.Linear(8, 4)
        self.fc3 = tnn.Linear(6, 8)  # registered after fc2 and fc4
        self.add = torch.ao.nn.quantized.FloatFunctional()
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        return self.dequant(self.fc4(self.add.add(self.fc2(self.relu(self.fc1(x))), self.fc3(x))))


class FlaxEagerSkip(nn.Module):
    @nn.compact
    def __call__(self, x):
        y = nn.Dense(8, name="fc2")(nn.relu(nn.Dense(16, name="fc1")(x))) + nn.Dense(8, name="fc3")(x)
        return nn.Dense(4, name="fc4")(y)


def test_eager_qat_model_is_traced_for_links():
    torch.manual_seed(0)
    tm = EagerSkip()
    tm.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(tm.train(), inplace=True)
    tm(torch.randn(32, 6))
    table = import_qparams(tm.state_dict(), model=tm)
    assert table["add"]["output"].consumers == ("fc4",)
    fm = FlaxEagerSkip()
    x0 = np.zeros((2, 6), np.float32)
    params = fm.init(jax.random.key(0), x0)
    qf = quantize(
        lambda p, x: fm.apply(p, x),
        [Rule(weight=spec_from_record(table["fc1"]["weight"]), inputs=spec_from_record(table["quant"]["output"]))],
    )
    qstate0 = qf.init(params, x0)
    rows = _rows(link_sites(table, qf.sites, qstate=qstate0))
    assert {k: v for k, v in rows.items() if k[1] == "input"} == {
        ("fc1", "input"): ("quant", "output", "graph"),
        ("fc3", "input"): ("quant", "output", "graph"),  # by order: fc4's output
        ("fc2", "input"): ("fc1", "output", "graph"),
        ("fc4", "input"): ("add", "output", "graph"),  # by order: fc2's output
    }


def test_torch_x86_preset_with_imported_qparams_equals_the_reference_model():
    import jquant

    if not hasattr(jquant.presets, "torch_x86"):
        pytest.skip("jquant.presets.torch_x86 is not there yet")
    prepared = _prepared()
    ref = convert_to_reference_fx(prepared)
    _, params, x0 = _jquant(import_qparams(ref.state_dict()), ref.state_dict())
    fm = FlaxSkip()
    qf = quantize(lambda p, x: fm.apply(p, x), jquant.presets.torch_x86())
    qstate0 = qf.init(params, x0)
    table = import_qparams(ref.state_dict(), model=ref)
    rows = _rows(link_sites(table, qf.sites, qstate=qstate0))
    assert rows[("fc1", "output")] == ("fc1", "output", "graph")  # fused Linear+ReLU: observed after the ReLU
    assert [v for k, v in rows.items() if k[0] == "FlaxSkip"] == [("_scale_0", "output", "graph")]  # the add
    qstate = import_qparams(ref.state_dict(), model=ref, qstate=qstate0, sites=qf.sites)
    x = torch.randn(256, 6) * 1.5
    out, _ = qf.apply(qstate, params, x.numpy(), mode="eval")
    np.testing.assert_allclose(np.asarray(out), ref(x).detach().numpy(), rtol=0, atol=1e-5)
