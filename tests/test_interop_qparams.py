"""Torch qparams <-> QParamRecord tables: every checkpoint format, values exactly as torch stores them."""

import copy
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
from safetensors.torch import save_file  # noqa: E402
from torch.ao import quantization as tq  # noqa: E402

from interop import InteropError, QParamRecord, export_qparams, import_qparams  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)


class Net(tnn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv = tnn.Conv2d(1, 4, 3)
        self.relu = tnn.ReLU()
        self.fc = tnn.Linear(4 * 6 * 6, 5)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        x = self.relu(self.conv(self.quant(x)))
        return self.dequant(self.fc(x.flatten(1)))


def _qat_model(backend="x86", seed=0, batches=3):
    torch.manual_seed(seed)
    m = Net()
    m.qconfig = tq.get_default_qat_qconfig(backend) if backend else tq.default_qat_qconfig
    m.train()
    tq.prepare_qat(m, inplace=True)
    for _ in range(batches):
        m(torch.randn(8, 1, 8, 8))
    return m


def _eq(a, b):
    a = np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.parametrize("backend", ["x86", "qnnpack", None])
def test_eager_qat_buffers_read_exactly(tmp_path, backend):
    m = _qat_model(backend)
    torch.save(m.state_dict(), tmp_path / "qat.pt")
    table = import_qparams(tmp_path / "qat.pt", model=m)
    assert set(table) == {"quant", "conv", "fc"}
    assert set(table["conv"]) == {"weight", "output"} and set(table["quant"]) == {"output"}
    for module, role, fq in [
        ("conv", "weight", m.conv.weight_fake_quant),
        ("conv", "output", m.conv.activation_post_process),
        ("fc", "weight", m.fc.weight_fake_quant),
        ("quant", "output", m.quant.activation_post_process),
    ]:
        rec = table[module][role]
        assert _eq(rec.scale, fq.scale) and _eq(rec.zero_point, fq.zero_point)
        assert _eq(rec.min_val, fq.activation_post_process.min_val)
        assert _eq(rec.max_val, fq.activation_post_process.max_val)
        assert (rec.quant_min, rec.quant_max) == (fq.quant_min, fq.quant_max)
        assert rec.qscheme == str(fq.qscheme).removeprefix("torch.")
        assert rec.dtype == {torch.qint8: "int8", torch.quint8: "uint8"}[fq.dtype]
        assert rec.inferred == () and rec.source == "eager_qat"
    assert type(m.fc.weight_fake_quant).__name__ == (
        "FakeQuantize" if backend is None else "FusedMovingAvgObsFakeQuantize"
    )


def test_eager_qat_without_model_infers_torch_defaults():
    m = _qat_model("qnnpack")
    table = import_qparams(m.state_dict())
    rec = table["conv"]["weight"]
    assert rec.qscheme == "per_tensor_symmetric" and rec.dtype == "int8" and "qscheme" in rec.inferred
    assert (table["fc"]["output"].quant_min, table["fc"]["output"].quant_max) == (0, 255)


def _fake_quant_outputs(model, x):
    model.apply(tq.disable_observer)
    return model(x).detach()


def test_export_into_prepare_qat_model_gives_identical_fake_quant_outputs():
    trained = _qat_model("x86", seed=0, batches=4)
    table = import_qparams(trained.state_dict(), model=trained)
    fresh = _qat_model("x86", seed=1, batches=1)
    # same float weights, different qparams: outputs differ before the export
    floats = {
        k: v
        for k, v in trained.state_dict().items()
        if k.endswith(("conv.weight", "conv.bias", "fc.weight", "fc.bias"))
    }
    fresh.load_state_dict(floats, strict=False)
    x = torch.randn(6, 1, 8, 8)
    expected = _fake_quant_outputs(copy.deepcopy(trained), x)
    assert not torch.equal(_fake_quant_outputs(copy.deepcopy(fresh), x), expected)
    exported = export_qparams(table, fresh)
    fresh.load_state_dict(exported, strict=True)
    assert torch.equal(_fake_quant_outputs(fresh, x), expected)
    for key, value in trained.state_dict().items():
        if key.endswith(("scale", "zero_point", "min_val", "max_val")):
            assert torch.equal(exported[key], value), key
    # and the table read back from the export equals the original table
    again = import_qparams(exported, model=fresh)
    assert all(again[m][r].equals(table[m][r]) for m in table for r in table[m])


def _fx_reference(seed):
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx

    torch.manual_seed(seed)
    m = tnn.Sequential(tnn.Linear(6, 8), tnn.ReLU(), tnn.Linear(8, 3)).eval()
    prepared = prepare_fx(m, tq.get_default_qconfig_mapping("x86"), (torch.randn(2, 6),))
    for _ in range(3):
        prepared(torch.randn(16, 6) * (seed + 1))
    return convert_to_reference_fx(prepared)


def test_fx_reference_modules(tmp_path):
    ref = _fx_reference(0)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    table = import_qparams(tmp_path / "ref.pt")
    state = ref.state_dict()
    w = table["2"]["weight"]
    assert w.source == "fx_reference" and w.qscheme == "per_channel_affine" and w.axis == 0
    assert _eq(w.scale, state["2.weight_scale"]) and _eq(w.zero_point, state["2.weight_zero_point"])
    fused = table["0.0"]["weight"]  # Linear+ReLU fused by FX into 0.0
    assert _eq(fused.scale, state["0.0.weight_scale"])
    assert _eq(table["0"]["input"].scale, state["0_input_scale_0"])  # FX node "0" (the fused Linear+ReLU)
    assert _eq(table["2"]["output"].zero_point, state["2_zero_point_0"])
    assert table["0"]["input"].dtype == "uint8" and table["0"]["input"].inferred == ("dtype",)
    # another reference model with the same float weights but other qparams (calibrated on other data)
    other = _fx_reference(1)
    floats = {k: v for k, v in state.items() if k.endswith((".weight", ".bias"))}
    other.load_state_dict({**other.state_dict(), **floats}, strict=True)
    x = torch.randn(4, 6) * 2
    assert not torch.equal(other(x), ref(x))
    exported = export_qparams(table, other)
    other.load_state_dict(exported, strict=True)
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and ("scale" in key or "zero_point" in key):
            assert torch.equal(other.state_dict()[key], value), key
    assert torch.equal(other(x), ref(x))


def test_converted_eager_model(tmp_path):
    m = _qat_model("x86")
    m.eval()
    converted = tq.convert(copy.deepcopy(m))
    torch.save(converted.state_dict(), tmp_path / "int8.pt")
    table = import_qparams(tmp_path / "int8.pt")
    fc_w = converted.fc.weight()
    rec = table["fc"]["weight"]
    assert rec.source == "eager_converted" and rec.qscheme == "per_channel_affine" and rec.axis == 0
    assert np.array_equal(rec.qdata, fc_w.int_repr().numpy())
    assert np.array_equal(rec.scale, fc_w.q_per_channel_scales().numpy())
    assert np.array_equal(table["conv"]["weight"].qdata, converted.conv.weight().int_repr().numpy())
    assert float(table["fc"]["output"].scale) == converted.fc.scale
    assert _eq(table["quant"]["output"].zero_point, converted.quant.zero_point)
    assert _eq(table["quant"]["output"].scale, converted.quant.scale)


def test_converted_quantized_embedding(tmp_path):
    import torch.ao.nn.quantized as nnq

    emb = nnq.Embedding(10, 4)
    torch.save({f"emb.{k}": v for k, v in emb.state_dict().items()}, tmp_path / "emb.pt")
    rec = import_qparams(tmp_path / "emb.pt")["emb"]["weight"]
    packed = emb.weight()
    assert rec.qscheme == "per_channel_affine_float_qparams" and rec.dtype == "uint8" and rec.axis == 0
    assert _eq(rec.scale, packed.q_per_channel_scales()) and _eq(rec.zero_point, packed.q_per_channel_zero_points())
    assert np.array_equal(rec.qdata, packed.int_repr().numpy())


def test_torchao_flattened_safetensors_without_torchao(tmp_path):
    # torchao is not installed here: write its flattened layout (Int8Tensor, per-row) by hand.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g)
    scale = w.abs().amax(dim=1, keepdim=True) / 127.5
    qdata = torch.clamp(torch.round(w / scale), -128, 127).to(torch.int8)
    tensors = {"lin._weight_qdata": qdata, "lin._weight_scale": scale, "lin.bias": torch.randn(6, generator=g)}
    meta = {
        "lin.weight": json.dumps(
            {
                "_type": "Int8Tensor",
                "_data": {"block_size": [1, 10], "dtype": {"_type": "torch.dtype", "_data": "float32"}},
                "_tensor_data_names": ["qdata", "scale"],
            }
        ),
        "lin.bias": json.dumps({"_type": "torch.Tensor"}),
        "tensor_names": json.dumps(["lin.weight", "lin.bias"]),
    }
    save_file(tensors, str(tmp_path / "ao.safetensors"), metadata=meta)
    rec = import_qparams(tmp_path / "ao.safetensors")["lin"]["weight"]
    assert rec.source == "torchao:Int8Tensor" and rec.qscheme == "per_channel_symmetric" and rec.axis == 0
    assert np.array_equal(rec.qdata, qdata.numpy()) and np.array_equal(rec.scale, scale.numpy().reshape(-1))
    # dequantizing the record reproduces torchao's weight-only linear weight
    deq = rec.qdata.astype(np.float32) * rec.scale[:, None]
    np.testing.assert_array_equal(deq, (qdata.float() * scale).numpy())


def test_torchao_intx_groupwise_without_torchao(tmp_path):
    # IntxUnpackedToInt8Tensor (int4 values in int8 storage), group size 4 along K, with zero points
    g = torch.Generator().manual_seed(1)
    qdata = torch.randint(-8, 8, (3, 8), generator=g, dtype=torch.int8)
    scale = torch.rand(3, 2, generator=g) + 0.1
    zero_point = torch.randint(-2, 3, (3, 2), generator=g, dtype=torch.int8)
    meta = {
        "w.weight": json.dumps(
            {
                "_type": "IntxUnpackedToInt8Tensor",
                "_data": {"block_size": [1, 4], "target_dtype": {"_type": "torch.dtype", "_data": "int4"}},
                "_tensor_data_names": ["qdata", "scale", "zero_point"],
            }
        ),
        "tensor_names": json.dumps(["w.weight"]),
    }
    tensors = {"w._weight_qdata": qdata, "w._weight_scale": scale, "w._weight_zero_point": zero_point}
    save_file(tensors, str(tmp_path / "intx.safetensors"), metadata=meta)
    rec = import_qparams(tmp_path / "intx.safetensors")["w"]["weight"]
    assert (rec.dtype, rec.quant_min, rec.quant_max, rec.block_size) == ("int4", -8, 7, (1, 4))
    assert rec.qscheme == "per_channel_affine"
    assert _eq(rec.scale, scale) and _eq(rec.zero_point, zero_point) and _eq(rec.qdata, qdata)


def test_gpt_fast_int8(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    scales = w.abs().amax(dim=1) / 127
    wq = torch.round(w / scales[:, None]).to(torch.int8)
    torch.save({"layers.0.weight": wq, "layers.0.scales": scales, "norm.weight": torch.ones(7)}, tmp_path / "gf.pt")
    table = import_qparams(tmp_path / "gf.pt")
    assert set(table) == {"layers.0"}
    rec = table["layers.0"]["weight"]
    assert (
        rec.source == "gpt_fast" and np.array_equal(rec.qdata, wq.numpy()) and np.array_equal(rec.scale, scales.numpy())
    )
    x = torch.randn(3, 7, generator=g)
    y_torch = (x @ wq.float().T) * scales
    y = (x.numpy() @ rec.qdata.astype(np.float32).T) * rec.scale
    np.testing.assert_allclose(y, y_torch.numpy(), rtol=1e-6, atol=1e-6)


def test_export_reports_unplaced_records():
    m = _qat_model("x86")
    rec = QParamRecord(
        "nowhere",
        "weight",
        np.ones(1, np.float32),
        np.zeros(1, np.int32),
        None,
        "int8",
        "per_tensor_symmetric",
        -128,
        127,
        "manual",
    )
    with pytest.raises(InteropError, match=r"nowhere \(weight\)"):
        export_qparams({"nowhere": {"weight": rec}}, m)
