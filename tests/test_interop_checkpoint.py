"""interop.load_torch_checkpoint / save_torch_checkpoint against real torch objects saved to disk."""

import json
import warnings

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import save_file  # noqa: E402

from interop import CheckpointError, QuantizedTensor, load_torch_checkpoint, save_torch_checkpoint  # noqa: E402
from interop.errors import UnsafeCheckpointError  # noqa: E402

warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def _bits(t):
    """Raw bits of a float torch tensor, for exact comparisons."""
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width).numpy()


def _mixed_state():
    g = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(5, 3, generator=g),
        "w16": torch.randn(4, generator=g).half(),
        "wbf": torch.randn(3, 2, generator=g).bfloat16(),
        "steps": torch.tensor(7, dtype=torch.int64),
    }


def _assert_same_as_torch(loaded, state):
    assert set(loaded) == set(state)
    for key, t in state.items():
        arr = loaded[key]
        assert arr.shape == tuple(t.shape)
        if t.dtype == torch.bfloat16:
            assert arr.dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(arr.view(np.int16), _bits(t))
        else:
            assert arr.dtype == t.numpy().dtype
            np.testing.assert_array_equal(arr, t.numpy())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_float_dtypes_load_bit_exact(tmp_path, suffix):
    state = _mixed_state()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    _assert_same_as_torch(load_torch_checkpoint(path), state)


def test_float8_safetensors_bit_exact(tmp_path):
    t = torch.randn(6).to(torch.float8_e4m3fn)
    save_file({"f8": t}, str(tmp_path / "m.safetensors"))
    arr = load_torch_checkpoint(tmp_path / "m.safetensors")["f8"]
    assert arr.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(arr.view(np.uint8), t.view(torch.uint8).numpy())


def _check_record(rec, qt):
    assert isinstance(rec, QuantizedTensor)
    np.testing.assert_array_equal(rec.data, qt.int_repr().numpy())
    assert rec.data.dtype == qt.int_repr().numpy().dtype
    np.testing.assert_array_equal(rec.dequantize(), qt.dequantize().numpy())
    if qt.qscheme() == torch.per_tensor_affine:
        assert (
            rec.axis is None and float(rec.scale) == qt.q_scale() and int(rec.zero_point) == qt.q_zero_point()
        )
    else:
        assert rec.axis == qt.q_per_channel_axis()
        np.testing.assert_array_equal(rec.scale, qt.q_per_channel_scales().numpy())
        np.testing.assert_array_equal(rec.zero_point, qt.q_per_channel_zero_points().numpy())


def test_quantized_tensors_per_tensor_and_per_channel(tmp_path):
    g = torch.Generator().manual_seed(1)
    qt = torch.quantize_per_tensor(torch.randn(4, 5, generator=g), 0.05, 17, torch.quint8)
    qc = torch.quantize_per_channel(
        torch.randn(3, 4, 2, generator=g),
        torch.tensor([0.01, 0.02, 0.03], dtype=torch.float64),
        torch.tensor([0, -3, 5]),
        0,
        torch.qint8,
    )
    qc1 = torch.quantize_per_channel(
        torch.randn(3, 4, generator=g),
        torch.rand(4, generator=g, dtype=torch.float64) + 0.01,
        torch.tensor([1, 2, 3, 4]),
        1,
        torch.quint8,
    )
    torch.save({"t": qt, "c": qc, "c1": qc1}, tmp_path / "q.pt")
    loaded = load_torch_checkpoint(tmp_path / "q.pt")
    _check_record(loaded["t"], qt)
    _check_record(loaded["c"], qc)
    _check_record(loaded["c1"], qc1)
    assert loaded["c"].qscheme == "per_channel_affine" and loaded["c"].dtype == "int8"
    assert loaded["t"].dtype == "uint8"


def test_converted_eager_quantized_modules(tmp_path):
    import torch.ao.nn.quantized as nnq

    g = torch.Generator().manual_seed(2)
    lin = nnq.Linear(4, 3)
    w = torch.quantize_per_channel(
        torch.randn(3, 4, generator=g),
        torch.tensor([0.1, 0.2, 0.05], dtype=torch.float64),
        torch.zeros(3, dtype=torch.int64),
        0,
        torch.qint8,
    )
    lin.set_weight_bias(w, torch.randn(3, generator=g))
    conv = nnq.Conv2d(2, 3, 3)
    state = {f"lin.{k}": v for k, v in lin.state_dict().items()}
    state.update({f"conv.{k}": v for k, v in conv.state_dict().items()})
    torch.save(state, tmp_path / "conv.pt")
    loaded = load_torch_checkpoint(tmp_path / "conv.pt")
    # fbgemm packing rounds the scales to float32: compare with what the module really holds
    _check_record(loaded["lin.weight"], lin.weight())
    np.testing.assert_array_equal(loaded["lin.weight"].data, w.int_repr().numpy())
    np.testing.assert_array_equal(loaded["lin.bias"], lin.bias().detach().numpy())
    assert loaded["lin._packed_params.dtype"] == "qint8"
    _check_record(loaded["conv.weight"], conv.weight())
    assert float(loaded["lin.scale"]) == lin.scale


def test_nested_state_dict_is_flattened(tmp_path):
    torch.save({"model": {"fc.weight": torch.ones(2, 2)}, "epoch": 3}, tmp_path / "n.pt")
    loaded = load_torch_checkpoint(tmp_path / "n.pt")
    assert set(loaded) == {"model.fc.weight", "epoch"}
    assert int(loaded["epoch"]) == 3


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_checkpoint_with_index(tmp_path, kind):
    state = _mixed_state()
    names = sorted(state)
    shards = {f"part-{i}.{kind}": {k: state[k] for k in names[i::2]} for i in range(2)}
    for fname, part in shards.items():
        if kind == "safetensors":
            save_file(part, str(tmp_path / fname))
        else:
            torch.save(part, tmp_path / fname)
    index_name = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    weight_map = {k: fname for fname, part in shards.items() for k in part}
    (tmp_path / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _assert_same_as_torch(load_torch_checkpoint(tmp_path / index_name), state)
    # a directory resolves to its index
    _assert_same_as_torch(load_torch_checkpoint(tmp_path), state)
    (tmp_path / f"part-1.{kind}").unlink()
    with pytest.raises(CheckpointError, match="part-1.*missing"):
        load_torch_checkpoint(tmp_path / index_name)


def test_index_listing_a_key_the_shard_lacks(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s.safetensors", "b": "s.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"s\.safetensors.*\['b'\]"):
        load_torch_checkpoint(index)


class _Custom:
    def __init__(self):
        self.value = 1


def test_pickle_with_custom_class_is_refused(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"w": torch.ones(2), "extra": _Custom()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"unsafe\.pt.*_Custom") as info:
        load_torch_checkpoint(path)
    assert isinstance(info.value, ValueError)


def test_pickled_whole_module_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(UnsafeCheckpointError, match=r"module\.pt.*torch\.nn\.modules\.linear\.Linear"):
        load_torch_checkpoint(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_files_name_the_file(tmp_path, suffix):
    path = tmp_path / f"full{suffix}"
    state = {"w": torch.randn(64, 64)}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cut\{suffix}"):
        load_torch_checkpoint(cut)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_corrupted_files_name_the_file(tmp_path, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=rf"junk\{suffix}"):
        load_torch_checkpoint(path)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.pt: file not found"):
        load_torch_checkpoint(tmp_path / "nothere.pt")
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"x\.npz: unknown checkpoint format"):
        load_torch_checkpoint(tmp_path / "x.npz")
    with pytest.raises(CheckpointError, match="directory holds none"):
        load_torch_checkpoint(tmp_path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_round_trip_is_bit_identical(tmp_path, suffix):
    state = _mixed_state()
    torch.save(state, tmp_path / "src.pt")
    loaded = load_torch_checkpoint(tmp_path / "src.pt")
    save_torch_checkpoint(loaded, tmp_path / f"dst{suffix}")
    back = load_torch_checkpoint(tmp_path / f"dst{suffix}")
    _assert_same_as_torch(back, state)
    if suffix == ".pt":
        reread = torch.load(tmp_path / "dst.pt", weights_only=True)
        for key, t in state.items():
            assert reread[key].dtype == t.dtype
            assert np.array_equal(
                _bits(reread[key]) if t.is_floating_point() else reread[key].numpy(),
                _bits(t) if t.is_floating_point() else t.numpy(),
            )


def test_quantized_round_trip_through_pt(tmp_path):
    qc = torch.quantize_per_channel(
        torch.randn(3, 4),
        torch.tensor([0.01, 0.02, 0.03], dtype=torch.float64),
        torch.tensor([0, 1, 2]),
        0,
        torch.quint8,
    )
    qt = torch.quantize_per_tensor(torch.randn(5), 0.1, -3, torch.qint8)
    torch.save({"c": qc, "t": qt}, tmp_path / "q.pt")
    save_torch_checkpoint(load_torch_checkpoint(tmp_path / "q.pt"), tmp_path / "q2.pt")
    reread = torch.load(tmp_path / "q2.pt", weights_only=True)
    for key, orig in {"c": qc, "t": qt}.items():
        assert reread[key].qscheme() == orig.qscheme() and reread[key].dtype == orig.dtype
        assert torch.equal(reread[key].int_repr(), orig.int_repr())
        assert torch.equal(reread[key].dequantize(), orig.dequantize())
    with pytest.raises(CheckpointError, match="use .pt"):
        save_torch_checkpoint(load_torch_checkpoint(tmp_path / "q.pt"), tmp_path / "q.safetensors")
    assert not (tmp_path / "q.safetensors").exists()
