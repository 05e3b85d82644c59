"""jquant-convert CLI: torch -> JAX checkpoints in every format and back, bit-identical; failures are clean."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn
from safetensors.torch import save_file  # noqa: E402

from interop import load_torch_checkpoint  # noqa: E402
from interop.cli import main  # noqa: E402
from interop.jax_checkpoint import load_jax_checkpoint  # noqa: E402


class Net(tnn.Module):
    def __init__(self):
        super().__init__()
        self.embed = tnn.Embedding(10, 4)
        self.conv = tnn.Conv2d(4, 6, 3)
        self.bn = tnn.BatchNorm2d(6)
        self.up = tnn.ConvTranspose2d(6, 2, 2)
        self.ln = tnn.LayerNorm(6)
        self.layers = tnn.ModuleList([tnn.Linear(6, 5), tnn.Linear(5, 3)])


def _state(dtype=torch.float32):
    torch.manual_seed(0)
    net = Net()
    net.bn.num_batches_tracked += 17
    with torch.no_grad():
        net.bn.running_mean.normal_()
    state = net.state_dict()
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


LAYOUT_FLAGS = ["--layout", r"^embed\.weight$=embedding", "--layout", r"^up\.weight$=conv_transpose"]


def _bits(t):
    if t.is_floating_point():
        return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()]).numpy()
    return t.numpy()


def _assert_identical(path, state):
    back = load_torch_checkpoint(path)
    assert set(back) == set(state)
    for key, t in state.items():
        arr = np.asarray(back[key])
        assert arr.shape == tuple(t.shape), key
        raw = arr.view({2: np.int16, 4: np.int32}[arr.itemsize]) if t.is_floating_point() else arr
        np.testing.assert_array_equal(raw, _bits(t), err_msg=key)


@pytest.mark.parametrize("fmt", ["safetensors", "msgpack", "orbax"])
def test_round_trip_every_format_is_bit_identical(tmp_path, fmt, capsys):
    state = _state()
    save_file(state, str(tmp_path / "model.safetensors"))
    dst = tmp_path / {"safetensors": "flax.safetensors", "msgpack": "flax.msgpack", "orbax": "flax_ckpt"}[fmt]
    assert main([str(tmp_path / "model.safetensors"), str(dst), "--format", fmt, *LAYOUT_FLAGS]) == 0
    tree, entries, extras = load_jax_checkpoint(dst)
    params = tree["params"]
    np.testing.assert_array_equal(params["layers_0"]["kernel"], state["layers.0.weight"].numpy().T)
    np.testing.assert_array_equal(params["conv"]["kernel"], state["conv.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["embed"]["embedding"], state["embed.weight"].numpy())
    flipped = state["up.weight"].numpy()[:, :, ::-1, ::-1].transpose(2, 3, 0, 1)
    np.testing.assert_array_equal(params["up"]["kernel"], flipped)
    np.testing.assert_array_equal(params["ln"]["scale"], state["ln.weight"].numpy())
    np.testing.assert_array_equal(tree["batch_stats"]["bn"]["mean"], state["bn.running_mean"].numpy())
    assert int(np.asarray(extras["bn.num_batches_tracked"])) == 17
    assert len(entries) == len(state) - 1
    for out in ("back.safetensors", "back.pt"):
        assert main([str(dst), str(tmp_path / out), "--to-torch", "--format", fmt]) == 0
        _assert_identical(tmp_path / out, state)
    # the .pt loads strictly into the torch module
    Net().load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True), strict=True)


def test_bf16_pt_source_round_trip(tmp_path):
    state = _state(torch.bfloat16)
    torch.save(state, tmp_path / "model.pt")
    assert main([str(tmp_path / "model.pt"), str(tmp_path / "j.msgpack"), *LAYOUT_FLAGS, "--progress"]) == 0
    assert main([str(tmp_path / "j.msgpack"), str(tmp_path / "back.pt"), "--to-torch"]) == 0
    _assert_identical(tmp_path / "back.pt", state)


def test_sharded_source(tmp_path):
    import json

    state = _state()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:5]}, str(tmp_path / "a.safetensors"))
    save_file({k: state[k] for k in keys[5:]}, str(tmp_path / "b.safetensors"))
    index = {k: ("a.safetensors" if i < 5 else "b.safetensors") for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    assert main([str(tmp_path), str(tmp_path / "j.safetensors"), *LAYOUT_FLAGS]) == 0
    assert main([str(tmp_path / "j.safetensors"), str(tmp_path / "back.safetensors"), "--to-torch"]) == 0
    _assert_identical(tmp_path / "back.safetensors", state)


def test_dry_run_prints_table_and_writes_nothing(tmp_path, capsys):
    save_file(_state(), str(tmp_path / "model.safetensors"))
    dst = tmp_path / "out.msgpack"
    assert main([str(tmp_path / "model.safetensors"), str(dst), "--dry-run", *LAYOUT_FLAGS]) == 0
    out = capsys.readouterr().out
    assert not dst.exists()
    lines = out.splitlines()
    assert lines[0].split() == ["torch", "name", "flax", "path", "torch", "shape", "flax", "shape", "dtype", "layout"]
    row = next(line for line in lines if line.startswith("conv.weight"))
    assert row.split()[1] == "params/conv/kernel" and row.split()[-1] == "conv"
    assert "(6, 4, 3, 3)" in row and "(3, 3, 4, 6)" in row
    assert any(line.startswith("up.weight") and line.endswith("conv_transpose") for line in lines)
    assert "ignored: bn.num_batches_tracked" in out


def test_failures_exit_nonzero_and_leave_destination_untouched(tmp_path, capsys):
    good = tmp_path / "model.safetensors"
    save_file(_state(), str(good))
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(good.read_bytes()[:100])
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"previous content")
    assert main([str(bad), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "jquant-convert: error:" in err and "broken.safetensors" in err
    assert dst.read_bytes() == b"previous content"
    assert sorted(os.listdir(tmp_path)) == ["broken.safetensors", "model.safetensors", "out.safetensors"]


def test_failure_during_write_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import interop.jax_checkpoint as jc

    save_file(_state(), str(tmp_path / "model.safetensors"))

    def explode(path, tensors, metadata=None):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(jc, "write_safetensors", explode)
    assert main([str(tmp_path / "model.safetensors"), str(tmp_path / "out.safetensors")]) == 1
    assert "disk full" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_quantized_checkpoint_is_reported(tmp_path, capsys):
    import torch.ao.nn.quantized as nnq

    torch.save(nnq.Linear(3, 2).state_dict(), tmp_path / "q.pt")
    assert main([str(tmp_path / "q.pt"), str(tmp_path / "o.msgpack")]) == 1
    assert "import_qparams" in capsys.readouterr().err
    assert not (tmp_path / "o.msgpack").exists()


def test_unsafe_pickle_is_reported(tmp_path, capsys):
    torch.save(tnn.Linear(2, 2), tmp_path / "m.pt")
    assert main([str(tmp_path / "m.pt"), str(tmp_path / "o.msgpack")]) == 1
    err = capsys.readouterr().err
    assert "m.pt" in err and "refused" in err


def test_usage_errors():
    with pytest.raises(SystemExit) as info:
        main(["only-one-arg"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["a.pt", "b.msgpack", "--layout", "no-equals-sign"])
