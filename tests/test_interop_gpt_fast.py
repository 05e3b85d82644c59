"""export_qparams(layout="gpt_fast"): gpt-fast's weight-only layouts, checked against torch and read back exactly."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from interop import InteropError, QParamRecord, export_qparams, import_qparams  # noqa: E402


def _int8_record(module, w, with_qdata):
    # gpt-fast's dynamically_quantize_per_channel: scales = max(amax / 127.5, eps), q = round(w / scales)
    scales = torch.clamp(w.abs().amax(dim=1) / 127.5, min=torch.finfo(torch.float32).eps)
    q = torch.clamp(torch.round(w / scales[:, None]), -128, 127).to(torch.int8)
    rec = QParamRecord(
        module, "weight", scales.numpy(), np.zeros(w.shape[0], np.int64), 0, "int8", "per_channel_symmetric",
        -128, 127, "gpt_fast", qdata=q.numpy() if with_qdata else None,
    )  # fmt: skip
    return rec, q


def test_int8_weight_only_layout_round_trips_and_runs_like_gpt_fast():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 20, generator=g)
    template = {"layers.0.weight": w, "layers.0.bias": torch.randn(12, generator=g), "norm.weight": torch.ones(20)}
    rec, q = _int8_record("layers.0", w, with_qdata=False)  # a jquant qstate has qparams, not int data
    out = export_qparams({"layers.0": {"weight": rec}}, template, layout="gpt_fast")
    assert out["layers.0.weight"].dtype == torch.int8 and torch.equal(out["layers.0.weight"], q)
    assert torch.equal(out["layers.0.scales"], torch.from_numpy(rec.scale))
    assert torch.equal(out["norm.weight"], template["norm.weight"]) and "layers.0.bias" in out
    # gpt-fast's WeightOnlyInt8Linear forward: F.linear(x, weight.to(x.dtype)) * scales
    x = torch.randn(3, 20, generator=g)
    y = torch.nn.functional.linear(x, out["layers.0.weight"].float()) * out["layers.0.scales"]
    back = import_qparams(out)["layers.0"]["weight"]
    np.testing.assert_allclose(
        y.numpy(), x.numpy() @ (back.qdata.astype(np.float32) * back.scale[:, None]).T, rtol=1e-5, atol=1e-5
    )
    expected, _ = _int8_record("layers.0", w, with_qdata=True)
    assert back.equals(expected)


def _int4_record(n=48, k=128, group=32, seed=0):
    rng = np.random.default_rng(seed)
    qdata = rng.integers(-8, 8, (n, k)).astype(np.int8)
    scale = (rng.random((n, k // group)) * 0.05 + 0.01).astype(np.float32)
    zp = rng.integers(-3, 4, (n, k // group)).astype(np.int32)
    return QParamRecord(
        "attn.wq", "weight", scale, zp, 0, "int4", "per_channel_affine", -8, 7, "gpt_fast",
        block_size=(1, group), qdata=qdata,
    )  # fmt: skip


def test_int4_layout_is_torch_cpu_int4pack_and_reads_back_equal():
    rec = _int4_record()  # 48 rows: one full 32-row block of the packed layout and a partial one
    out = export_qparams({"attn.wq": {"weight": rec}}, {}, layout="gpt_fast")
    packed, sz = out["attn.wq.weight"], out["attn.wq.scales_and_zeros"]
    assert packed.dtype == torch.uint8 and packed.shape == (48, 64) and sz.shape == (4, 48, 2)
    # torch's int4 CPU kernel (gpt-fast's WeightOnlyInt4Linear forward on CPU) dequantizes what we wrote
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    deq = (rec.qdata.astype(np.float32) - np.repeat(rec.zero_point, 32, 1)) * np.repeat(rec.scale, 32, 1)
    np.testing.assert_allclose(y.numpy(), x.numpy() @ deq.T, rtol=1e-4, atol=1e-4)
    back = import_qparams(out)["attn.wq"]["weight"]
    assert back.equals(rec), (back, rec)


def test_layouts_gpt_fast_lacks_are_errors():
    rec = _int4_record()
    per_tensor = QParamRecord(
        "fc", "weight", np.float32(0.1), np.int64(3), None, "int8", "per_tensor_affine", -128, 127, "x"
    )
    with pytest.raises(InteropError, match=r"fc \(weight\) is int8 per_tensor_affine.*gpt-fast has"):
        export_qparams({"fc": {"weight": per_tensor}}, {"fc.weight": torch.zeros(2, 2)}, layout="gpt_fast")
    bad = {"attn.wq.weight": torch.zeros(48, 64, dtype=torch.int32), "attn.wq.scales_and_zeros": torch.zeros(4, 48, 2)}
    with pytest.raises(InteropError, match=r"attn\.wq\.weight: gpt-fast int4 weight .*CUDA tinygemm layout"):
        import_qparams(bad)
    assert rec.block_size == (1, 32)
