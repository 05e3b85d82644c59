"""jquant-convert maps nn.Embedding to nn.Embed's ``embedding`` (unchanged), says every non-trivial layout
decision, and documents its output layout in --help (issue #12, item 12)."""

import numpy as np
import pytest
import torch
from flax import serialization
from safetensors.numpy import save_file

from interop.cli import main
from interop.jax_checkpoint import load_jax_checkpoint


def test_embedding_maps_to_embed_embedding_unchanged(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 4), "fc": torch.nn.Linear(4, 3)})
    src = tmp_path / "m.pt"
    torch.save(model.state_dict(), src)
    assert main([str(src), str(tmp_path / "p.msgpack")]) == 0
    err = capsys.readouterr().err
    tree, _, _ = load_jax_checkpoint(tmp_path / "p.msgpack")
    assert set(tree["params"]["emb"]) == {"embedding"}
    np.testing.assert_array_equal(tree["params"]["emb"]["embedding"], model["emb"].weight.detach().numpy())
    np.testing.assert_array_equal(tree["params"]["fc"]["kernel"], model["fc"].weight.detach().numpy().T)
    assert "emb.weight (10, 4) -> params/emb/embedding (10, 4): Embedding weight -> nn.Embed embedding" in err
    assert "guessed from the module name; --layout 'emb\\.weight$=linear'" in err
    assert "fc.weight (3, 4) -> params/fc/kernel (4, 3): Linear weight (out, in) -> Dense kernel (in, out)" in err
    # the guess can be overridden
    assert main([str(src), str(tmp_path / "q.msgpack"), "--layout", r"^emb\.weight$=linear"]) == 0
    tree, _, _ = load_jax_checkpoint(tmp_path / "q.msgpack")
    assert tree["params"]["emb"]["kernel"].shape == (4, 10)


def test_to_torch_says_renames_and_3d_kernel_guesses(tmp_path, capsys):
    kernel = np.arange(2 * 3 * 4, dtype=np.float32).reshape(8, 3, 1)
    tree = {"params": {"Block_0": {"attn": {"query": {"kernel": kernel}}, "norm": {"scale": np.ones(8, np.float32)}}}}
    src = tmp_path / "foreign.msgpack"
    src.write_bytes(serialization.msgpack_serialize(tree))
    assert main([str(src), str(tmp_path / "t.safetensors"), "--to-torch"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "query/kernel" in x)
    assert "params/Block_0/attn/query/kernel (8, 3, 1) -> Block.0.attn.query.weight (1, 3, 8)" in line
    assert "a 3-d kernel is taken as a Conv1d kernel" in line and "=identity'" in line
    assert "Block_0 become Block.0" in line
    capsys.readouterr()
    assert main([str(src), str(tmp_path / "u.safetensors"), "--to-torch", "--layout", r"query\.weight$=identity"]) == 0
    from safetensors.numpy import load_file

    assert load_file(str(tmp_path / "u.safetensors"))["Block.0.attn.query.weight"].shape == (8, 3, 1)


def test_round_trip_says_it_restored_the_mapping(tmp_path, capsys):
    src = tmp_path / "m.safetensors"
    save_file({"fc.weight": np.ones((3, 4), np.float32)}, str(src))
    assert main([str(src), str(tmp_path / "p.safetensors")]) == 0
    capsys.readouterr()
    assert main([str(tmp_path / "p.safetensors"), str(tmp_path / "back.safetensors"), "--to-torch"]) == 0
    assert "restored 1 torch names and layouts from the stored jquant mapping" in capsys.readouterr().err


def test_help_documents_the_output_layout(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "{'variables': {'params': ..., 'batch_stats': ...}," in out
    assert "'jquant': {'mapping': <JSON table>, 'extras': {torch-only buffers}}" in out
    assert "__torch_extra__" in out and "jquant_mapping.json" in out
