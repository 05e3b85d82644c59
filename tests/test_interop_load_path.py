"""Loading a torch checkpoint from a file gives what its in-memory state_dict gives: quint4x2 embeddings,
float-qparams per-channel tensors, ``None`` entries (bias-less quantized conv, fp16 reference modules), through
torch's weights-only loader and safetensors; unsupported content is an error naming the file, the key and the fix."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
tnn = torch.nn
from safetensors.torch import save_file  # noqa: E402
from torch.ao import quantization as tq  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx  # noqa: E402

from interop import QuantizedTensor, import_qparams, load_torch_checkpoint, save_torch_checkpoint  # noqa: E402
from interop.checkpoint import state_dict_to_numpy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


class Embeddings(tnn.Module):
    def __init__(self):
        super().__init__()
        self.emb = tnn.Embedding(10, 7)
        self.bag = tnn.EmbeddingBag(12, 6, mode="sum")

    def forward(self, x):
        return self.emb(x)


class Fc(tnn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc = tnn.Linear(4, 3, bias=bias)

    def forward(self, x):
        return self.fc(x)


def _embeddings(qconfig):
    torch.manual_seed(0)
    m = Embeddings().eval()
    m.emb.qconfig = m.bag.qconfig = qconfig
    tq.prepare(m, inplace=True)
    return tq.convert(m, inplace=True)


def _static(layer, example):
    torch.manual_seed(0)
    m = tnn.Sequential(tq.QuantStub(), layer, tq.DeQuantStub()).eval()
    m.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(m, inplace=True)
    m(example)
    return tq.convert(m, inplace=True)


def _fp16_reference():
    p = prepare_fx(Fc().eval(), tq.QConfigMapping().set_global(tq.float16_dynamic_qconfig), (torch.randn(2, 4),))
    return convert_to_reference_fx(p)


MODELS = {
    "embedding_quint4x2": lambda: _embeddings(tq.float_qparams_weight_only_qconfig_4bit),
    "embedding_quint8_float_qparams": lambda: _embeddings(tq.float_qparams_weight_only_qconfig),
    "linear_without_bias": lambda: _static(tnn.Linear(4, 3, bias=False), torch.randn(8, 4)),
    "conv_without_bias": lambda: _static(tnn.Conv2d(2, 3, 3, bias=False), torch.randn(2, 2, 5, 5)),
    "dynamic_fp16": lambda: tq.quantize_dynamic(Fc().eval(), {tnn.Linear: tq.float16_dynamic_qconfig}),
    "dynamic_int8_without_bias": lambda: tq.quantize_dynamic(Fc(bias=False).eval(), {tnn.Linear}),
    "fx_reference_fp16": _fp16_reference,  # weight_qscheme is None
}


def _same(a, b):
    if isinstance(a, QuantizedTensor):
        return a.equals(b)
    if isinstance(a, str):
        return a == b
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def _assert_same_dicts(got, expected):
    assert list(got) == list(expected)
    different = [k for k in expected if not _same(expected[k], got[k])]
    assert not different


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_saved_state_dict_loads_like_the_live_one(name, tmp_path):
    # keep the module alive: the qparams of torch's quantized Embedding state_dict tensors point into the
    # module's packed weight (freed with the module; measured on torch 2.13)
    model = MODELS[name]()
    state = model.state_dict()
    path = tmp_path / f"{name}.pt"
    torch.save(state, path)
    loaded = load_torch_checkpoint(path)
    _assert_same_dicts(loaded, state_dict_to_numpy(state))
    assert not any(v is None for v in loaded.values())
    # qparams read from the file equal the ones read from the live state_dict
    from_file, live = import_qparams(path), import_qparams(state)
    assert {m: set(r) for m, r in from_file.items()} == {m: set(r) for m, r in live.items()}
    assert all(from_file[m][role].equals(rec) for m, roles in live.items() for role, rec in roles.items())


def test_none_entries_are_left_out(tmp_path):
    conv = MODELS["conv_without_bias"]()
    state = conv.state_dict()
    assert state["1.bias"] is None
    torch.save(state, tmp_path / "c.pt")
    loaded = load_torch_checkpoint(tmp_path / "c.pt")
    assert "1.bias" not in loaded and isinstance(loaded["1.weight"], QuantizedTensor)
    fp16 = MODELS["fx_reference_fp16"]()
    ref = fp16.state_dict()
    assert ref["fc.weight_qscheme"] is None
    torch.save(ref, tmp_path / "r.pt")
    assert set(load_torch_checkpoint(tmp_path / "r.pt")) == set(ref) - {"fc.weight_qscheme"}


def test_quint4x2_unpacks_to_uint4_equal_to_torch(tmp_path):
    model = MODELS["embedding_quint4x2"]()
    state = model.state_dict()
    torch.save(state, tmp_path / "e.pt")
    loaded = load_torch_checkpoint(tmp_path / "e.pt")
    for module in ("emb", "bag"):
        t = state[f"{module}._packed_params._packed_weight"]
        rec = loaded[f"{module}._packed_params._packed_weight"]
        assert t.dtype == torch.quint4x2 and rec.dtype == "uint4" and rec.data.dtype == np.uint8
        assert rec.qscheme == "per_channel_affine_float_qparams" and rec.axis == 0 and rec.shape == tuple(t.shape)
        assert rec.data.max() <= 15 and rec.zero_point.dtype == np.float32
        assert not np.array_equal(rec.zero_point, np.round(rec.zero_point))  # float zero points kept
        np.testing.assert_array_equal(rec.scale, t.q_per_channel_scales().numpy())
        deq = (rec.data.astype(np.float32) - rec.zero_point[:, None]) * rec.scale[:, None]
        np.testing.assert_allclose(deq, t.dequantize().numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 5), (4, 6), (1, 1), (7,)])
def test_per_tensor_quint4x2_of_odd_sizes(shape, tmp_path):
    t = torch.quantize_per_tensor(torch.randn(shape), 0.25, 3, torch.quint4x2)
    torch.save({"t": t}, tmp_path / "t.pt")
    rec = load_torch_checkpoint(tmp_path / "t.pt")["t"]
    assert rec.shape == shape and rec.dtype == "uint4"
    np.testing.assert_array_equal(rec.dequantize(), t.dequantize().numpy())


def test_quint4x2_round_trips_through_save_torch_checkpoint(tmp_path):
    model = MODELS["embedding_quint4x2"]()
    torch.save(model.state_dict(), tmp_path / "a.pt")
    save_torch_checkpoint(load_torch_checkpoint(tmp_path / "a.pt"), tmp_path / "b.pt")
    again = torch.load(tmp_path / "b.pt", weights_only=True)
    for key, t in model.state_dict().items():
        if isinstance(t, torch.Tensor):
            assert again[key].dtype == t.dtype and again[key].qscheme() == t.qscheme()
            assert torch.equal(again[key].int_repr(), t.int_repr())
            assert torch.equal(again[key].q_per_channel_scales(), t.q_per_channel_scales())
            assert torch.equal(again[key].q_per_channel_zero_points(), t.q_per_channel_zero_points())
        else:
            assert again[key] == t
    fresh = MODELS["embedding_quint4x2"]()
    fresh.load_state_dict(again)
    # torch's converted 4-bit Embedding cannot run forward (its module dtype says quint8); the bag can
    idx, offsets = torch.arange(12), torch.tensor([0, 5])
    assert torch.equal(fresh.bag(idx, offsets), model.bag(idx, offsets))


def test_float_qparams_safetensors_load_like_the_live_state_dict(tmp_path):
    torch.manual_seed(0)
    emb = torch.ao.nn.qat.Embedding(10, 4, qconfig=tq.default_embedding_qat_qconfig)
    emb(torch.randint(0, 10, (20,)))
    state = {f"emb.{k}": v for k, v in emb.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "e.safetensors"))
    loaded = load_torch_checkpoint(tmp_path / "e.safetensors")
    expected = state_dict_to_numpy(state)
    assert set(loaded) == set(expected) and all(_same(expected[k], loaded[k]) for k in expected)
    assert loaded["emb.weight_fake_quant.zero_point"].dtype == np.float32
    rec = import_qparams(tmp_path / "e.safetensors")["emb"]["weight"]
    assert rec.equals(import_qparams(state)["emb"]["weight"])
    assert rec.qscheme == "per_channel_affine_float_qparams"


def test_unsupported_quantized_dtype_names_the_file_the_key_and_the_fix(tmp_path):
    t = torch.quantize_per_tensor(torch.randn(3, 5), 0.1, 1, torch.quint2x4)
    torch.save({"enc.weight": t}, tmp_path / "q2.pt")
    with pytest.raises(
        TypeError, match=r"q2\.pt:enc\.weight: quantized dtype torch\.quint2x4 .*save t\.dequantize\(\)"
    ):
        load_torch_checkpoint(tmp_path / "q2.pt")


def test_an_expanded_quantized_view_is_refused_before_materializing(tmp_path):
    # torch's weights-only loader rebuilds quantized tensors with the pickle's strides: one stored byte could
    # become 16 MiB of int data
    q = torch.quantize_per_tensor(torch.zeros(1, 1), 0.1, 0, torch.quint8).expand(4096, 4096)
    torch.save({"big": q}, tmp_path / "qbomb.pt")
    assert (tmp_path / "qbomb.pt").stat().st_size < 4096
    with pytest.raises(TypeError, match=r"qbomb\.pt:big: shape \(4096, 4096\) has 16777216 elements but its storage"):
        load_torch_checkpoint(tmp_path / "qbomb.pt")
