"""torchao's own flattened safetensors (written by torchao itself) import into jquant records exactly."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchao = pytest.importorskip("torchao")
from safetensors.torch import save_file  # noqa: E402
from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict  # noqa: E402
from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: E402

from interop import import_qparams  # noqa: E402


def test_int8_weight_only_checkpoint_from_torchao(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    quantize_(model, Int8WeightOnlyConfig())
    tensors, metadata = flatten_tensor_state_dict(model.state_dict())
    save_file(tensors, str(tmp_path / "ao.safetensors"), metadata=metadata)

    table = import_qparams(tmp_path / "ao.safetensors")
    for name, layer in (("0", model[0]), ("2", model[2])):
        rec = table[name]["weight"]
        # torchao 0.18 stores an explicit (all-zero) zero point: read as per-channel affine with zp 0
        assert rec.qscheme.startswith("per_channel") and rec.axis == 0, rec
        assert np.array_equal(rec.qdata, layer.weight.qdata.numpy())
        assert np.array_equal(rec.scale, layer.weight.scale.float().numpy().reshape(-1))
        zero_point = getattr(layer.weight, "zero_point", None)
        want_zp = np.zeros(rec.scale.shape) if zero_point is None else zero_point.numpy().reshape(-1)
        assert np.array_equal(np.asarray(rec.zero_point).reshape(-1), want_zp)
        # the record dequantizes to the weight torchao computes with
        want = layer.weight.dequantize().float().numpy()
        np.testing.assert_allclose(rec.qdata.astype(np.float32) * rec.scale[:, None], want, rtol=1e-6, atol=1e-7)
