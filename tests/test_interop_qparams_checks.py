"""import_qparams: bad qparams are errors naming the torch key (#12 item 2); unusual torch formats load (#11):
FX add/cat output qparams, float-qparams zero points, quint4x2 tensors, fp16 and dynamic modules, custom ranges."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
import torch.ao.nn.quantized as nnq  # noqa: E402
from torch.ao import quantization as tq  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx  # noqa: E402

from interop import InteropError, import_qparams, qparams_to_qstate  # noqa: E402
from interop.qsites import SiteLink  # noqa: E402
from jquant.transform.slots import ObservedSlot  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _converted(scale, zero_point, scale_dtype=torch.float32):
    return {"fc.scale": torch.tensor(scale, dtype=scale_dtype), "fc.zero_point": torch.tensor(zero_point)}


@pytest.mark.parametrize(
    ("scale", "what"),
    [
        (0.0, "zero"),
        (-0.5, "negative"),
        (float("nan"), "NaN"),
        (float("inf"), "infinite"),
        (1e-40, "subnormal"),  # float32 subnormal: XLA flushes it to 0
        (1e39, "infinite"),  # finite in float64, inf once it is the float32 jquant computes with
    ],
)
def test_bad_scales_are_errors_naming_the_key(scale, what):
    dtype = torch.float64 if abs(scale) > 3e38 else torch.float32
    with pytest.raises(InteropError, match=rf"^fc\.scale: torch fc \(output.*{what}.*Recalibrate"):
        import_qparams(_converted(scale, 0, dtype))


@pytest.mark.parametrize("zero_point", [256, -1, 2**40])
def test_zero_points_outside_the_range_are_errors(zero_point):
    # 2**40 would wrap to 0 in the int32 qstate: it must be caught before any cast
    with pytest.raises(InteropError, match=rf"^fc\.zero_point: .*is {zero_point} \(int64\), outside the.*\[0, 255\]"):
        import_qparams(_converted(0.1, zero_point))
    # torch refuses such zero points too
    with pytest.raises(RuntimeError):
        torch.fake_quantize_per_tensor_affine(torch.zeros(2), 0.1, zero_point, 0, 255)


def test_per_channel_and_eager_qat_keys_are_named():
    m = tnn.Sequential(tnn.Linear(4, 3))
    m.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(m.train(), inplace=True)
    m(torch.randn(5, 4))
    state = m.state_dict()
    state["0.weight_fake_quant.scale"] = torch.tensor([0.1, 0.0, 0.2])
    with pytest.raises(InteropError, match=r"^0\.weight_fake_quant\.scale: .* at index 1 is 0\.0"):
        import_qparams(state, model=m)
    state = m.state_dict()
    state["0.activation_post_process.zero_point"] = torch.tensor([200], dtype=torch.int32)  # x86: 0..127
    with pytest.raises(InteropError, match=r"activation_post_process\.zero_point: .*200.*\[0, 127\]"):
        import_qparams(state, model=m)
    # without the model the range is inferred, and the error says so
    with pytest.raises(InteropError, match=r"outside the inferred uint8 range \[0, 255\]; pass model="):
        import_qparams({**_converted(0.1, 0), "fc.zero_point": torch.tensor(-3)})


class AddCat(tnn.Module):
    def __init__(self):
        super().__init__()
        self.a = tnn.Linear(4, 4)
        self.b = tnn.Linear(4, 4)
        self.c = tnn.Linear(8, 2)

    def forward(self, x):
        return self.c(torch.cat([self.a(x) + self.b(x), self.b(x)], 1))


def test_fx_add_and_cat_output_qparams_are_read():
    torch.manual_seed(0)
    p = prepare_fx(AddCat().eval(), tq.get_default_qconfig_mapping("x86"), (torch.randn(2, 4),))
    p(torch.randn(32, 4))
    ref = convert_to_reference_fx(p)
    state = ref.state_dict()
    table = import_qparams(state, model=ref)
    assert {k for k in state if k.startswith("_scale_")} == {"_scale_0", "_scale_1"}
    for key in ("_scale_0", "_scale_1"):
        rec = table[key]["output"]
        assert rec.scale == state[key].numpy() and rec.zero_point == state[key.replace("scale", "zero_point")].numpy()
    assert (table["_scale_0"]["output"].producer, table["_scale_1"]["output"].producer) == ("add", "cat")
    assert table["_scale_1"]["output"].consumers == ("c",)


def test_float_qparams_zero_points_load_into_a_float_slot():
    emb = torch.ao.nn.qat.Embedding(10, 4, qconfig=tq.default_embedding_qat_qconfig)
    emb(torch.randint(0, 10, (20,)))
    state = {f"emb.{k}": v for k, v in emb.state_dict().items()}
    rec = import_qparams(state)["emb"]["weight"]  # no model: float zero points say float-qparams
    assert rec.qscheme == "per_channel_affine_float_qparams" and rec.dtype == "uint8" and rec.axis == 0
    np.testing.assert_array_equal(rec.zero_point, emb.weight_fake_quant.zero_point.numpy())
    assert not np.array_equal(rec.zero_point, np.round(rec.zero_point))  # really fractional

    class _Site:
        name = "emb"
        operands = ()

        def operand(self, key):
            return type("Op", (), {"spec": None})()

    slot = ObservedSlot(None, np.ones(10, np.float32), np.zeros(10, np.float32))
    out = qparams_to_qstate(
        {"emb": {"weight": rec}},
        {"emb": {"weight": slot}},
        [_Site()],
        links=[SiteLink("emb", "weight", "emb", "weight", "name")],
    )
    np.testing.assert_array_equal(out["emb"]["weight"].zero_point, rec.zero_point.astype(np.float32))


def test_quint4x2_embedding_reads_as_uint4():
    e = tnn.Embedding(10, 8)
    e.qconfig = tq.float_qparams_weight_only_qconfig_4bit
    q = nnq.Embedding.from_float(e)
    state = {f"emb.{k}": v for k, v in q.state_dict().items()}
    rec = import_qparams(state)["emb"]["weight"]
    assert (rec.dtype, rec.quant_min, rec.quant_max, rec.qscheme) == (
        "uint4",
        0,
        15,
        "per_channel_affine_float_qparams",
    )
    assert rec.qdata.shape == (10, 8) and rec.qdata.max() <= 15
    deq = (rec.qdata.astype(np.float32) - rec.zero_point[:, None]) * rec.scale[:, None]
    np.testing.assert_allclose(deq, q.weight().dequantize().numpy(), rtol=0, atol=1e-6)


class Lin(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc = tnn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("convert", [convert_fx, convert_to_reference_fx])
def test_fp16_modules_load_without_made_up_qparams(convert):
    p = prepare_fx(Lin().eval(), tq.QConfigMapping().set_global(tq.float16_dynamic_qconfig), (torch.randn(2, 4),))
    m = convert(p)
    assert import_qparams(m.state_dict()) == {} and import_qparams(m.state_dict(), model=m) == {}


def test_dynamic_int8_module_has_no_output_qparams():
    d = tq.quantize_dynamic(Lin(), {tnn.Linear}, dtype=torch.qint8)
    table = import_qparams(d.state_dict(), model=d)
    assert set(table["fc"]) == {"weight"}


def test_custom_weight_range_is_read_from_the_model():
    qconfig = tq.QConfig(
        activation=tq.MinMaxObserver.with_args(quant_min=0, quant_max=15, dtype=torch.quint8),
        weight=tq.PerChannelMinMaxObserver.with_args(
            quant_min=-8, quant_max=7, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        ),
    )
    p = prepare_fx(Lin().eval(), tq.QConfigMapping().set_global(qconfig), (torch.randn(2, 4),))
    p(torch.randn(16, 4))
    ref = convert_to_reference_fx(p)
    rec = import_qparams(ref.state_dict(), model=ref)["fc"]["weight"]
    assert (rec.quant_min, rec.quant_max) == (-8, 7) and rec.inferred == ()
    guessed = import_qparams(ref.state_dict())["fc"]["weight"]
    assert (guessed.quant_min, guessed.quant_max) == (-128, 127) and "quant_min" in guessed.inferred
