"""Bad or hostile checkpoints give one-line errors naming the file and the key, never a traceback, a
silently merged tensor, unbounded memory or a read outside the checkpoint folder (issue #12, items 3, 5, 6, 7)."""

import json
import resource

import numpy as np
import pytest
import torch
from flax import serialization
from safetensors.numpy import save_file

from interop import CheckpointError, MappingError, load_torch_checkpoint
from interop.cli import main
from interop.flat_mapping import flatten_tree, torch_to_tree, unflatten_tree


def _cli_error(capsys, *argv):
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("jquant-convert: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- item 3: key collisions -------------------------------------------------------------------------------

def test_nested_and_dotted_keys_that_collide_are_an_error(tmp_path, capsys):
    path = tmp_path / "c.pt"
    torch.save({"fc.weight": torch.ones(2, 2), "fc": {"weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(CheckpointError, match=r"entries \['fc.weight'\] and \['fc'\]\['weight'\] both flatten"):
        load_torch_checkpoint(path)
    err = _cli_error(capsys, path, tmp_path / "out.msgpack")
    assert "c.pt" in err and "'fc.weight'" in err
    assert not (tmp_path / "out.msgpack").exists()


def test_parameter_and_module_with_one_flax_path_collide():
    state = {"fc.weight": np.ones((2, 3), np.float32), "fc": np.ones(3, np.float32)}
    with pytest.raises(MappingError, match=r"torch keys 'fc.weight' and 'fc' collide"):
        torch_to_tree(state)
    with pytest.raises(MappingError, match=r"torch keys 'fc' and 'fc.weight' collide"):
        torch_to_tree(dict(reversed(list(state.items()))))


def test_tree_paths_that_collide_are_an_error():
    with pytest.raises(MappingError, match=r"entries \['a/b'\] and \['a'\]\['b'\] both flatten to the path 'a/b'"):
        flatten_tree({"a/b": np.ones(1), "a": {"b": np.ones(1)}})
    with pytest.raises(MappingError, match=r"paths 'a' and 'a/b' collide"):
        unflatten_tree({"a": np.ones(1), "a/b": np.ones(1)})


def test_jax_safetensors_with_colliding_paths(tmp_path, capsys):
    path = tmp_path / "params.safetensors"
    save_file({"params/fc": np.ones(2, np.float32), "params/fc/kernel": np.ones(2, np.float32)}, str(path))
    err = _cli_error(capsys, path, tmp_path / "back.safetensors", "--to-torch")
    assert "params.safetensors" in err and "'params/fc'" in err and "'params/fc/kernel'" in err


# --- item 5: memory bounded by the file ---------------------------------------------------------------------

def test_expanded_view_is_refused_before_allocating(tmp_path, capsys):
    path = tmp_path / "bomb.pt"
    torch.save({"big": torch.zeros(1, 1).expand(2**14, 2**14)}, path)
    assert path.stat().st_size < 4096
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TypeError, match=r"bomb.pt:big: shape \(16384, 16384\) has 268435456 elements but its "
                                        r"storage holds only 1"):
        load_torch_checkpoint(path)
    err = _cli_error(capsys, path, tmp_path / "out.msgpack")
    assert "bomb.pt:big" in err
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 * 1024  # nowhere near the 1 GiB the view would take


def test_many_views_of_one_storage_are_refused(tmp_path, monkeypatch):
    import interop.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "_MAX_BYTES_PER_FILE_BYTE", 1)
    base = torch.zeros(2**20)  # 4 MiB
    path = tmp_path / "views.pt"
    torch.save({f"v{i}": base for i in range(20)}, path)  # 80 MiB of tensors in a 4 MiB file
    with pytest.raises(CheckpointError, match=r"views.pt: its tensors would take 83886080 bytes"):
        load_torch_checkpoint(path)


# --- item 6: shard indexes ------------------------------------------------------------------------------------

def _index(tmp_path, weight_map, name="model.safetensors.index.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"weight_map": weight_map}))
    return path


def test_index_pointing_at_itself_is_an_error(tmp_path, capsys):
    path = _index(tmp_path, {"a": "model.safetensors.index.json"})
    with pytest.raises(CheckpointError, match=r"weight_map\['a'\] = 'model.safetensors.index.json' is a shard index"):
        load_torch_checkpoint(path)
    assert "is a shard index itself" in _cli_error(capsys, path, tmp_path / "o.msgpack")


def test_list_weight_map_is_an_error(tmp_path, capsys):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(CheckpointError, match=r"'weight_map' must be an object .* got list"):
        load_torch_checkpoint(path)
    assert "model.safetensors.index.json" in _cli_error(capsys, path, tmp_path / "o.msgpack")


@pytest.mark.parametrize("shard", ["../secret.safetensors", "/etc/passwd", "sub/../../secret.safetensors"])
def test_shard_outside_the_folder_is_never_read(tmp_path, shard, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "secret.safetensors"))
    path = _index(folder, {"a": shard})
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    with pytest.raises(CheckpointError, match=r"points outside the checkpoint folder"):
        load_torch_checkpoint(path)
    assert opened == [str(path)]


def test_symlinked_shard_leading_outside_is_refused(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "secret.safetensors"))
    (folder / "shard.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        load_torch_checkpoint(_index(folder, {"a": "shard.safetensors"}))


def test_good_index_still_loads(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": np.zeros(2, np.float32)}, str(tmp_path / "s2.safetensors"))
    out = load_torch_checkpoint(_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"}))
    assert set(out) == {"a", "b"}


# --- item 7: one-line CLI errors naming file and key -------------------------------------------------------------

@pytest.mark.parametrize(
    "name,value,expect",
    [
        ("meta", torch.ones(2, device="meta"), "meta.pt:a: is a meta tensor"),
        ("sparse", torch.eye(3).to_sparse(), "sparse.pt:a: is a sparse tensor"),
        ("nested", None, "nested.pt:a: is a nested tensor"),
    ],
)
def test_unusual_tensors_are_one_line_errors(tmp_path, capsys, name, value, expect):
    if value is None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns that nested tensors are a prototype
            value = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    path = tmp_path / f"{name}.pt"
    torch.save({"a": value}, path)
    assert expect in _cli_error(capsys, path, tmp_path / "o.msgpack")


def test_empty_key_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "empty.pt"
    torch.save({"": torch.ones(2)}, path)
    assert "empty.pt: entry [''] has an empty or non-string name" in _cli_error(capsys, path, tmp_path / "o.msgpack")
    st = tmp_path / "empty.safetensors"
    save_file({"": np.ones(2, np.float32)}, str(st))
    assert "empty.safetensors: '': empty tensor name" in _cli_error(capsys, st, tmp_path / "o.msgpack")


def test_string_entry_is_not_called_a_quantized_checkpoint(tmp_path, capsys):
    path = tmp_path / "s.pt"
    torch.save({"note": "hello", "w": torch.ones(2)}, path)
    err = _cli_error(capsys, path, tmp_path / "o.msgpack")
    assert "s.pt: note: holds the string 'hello', not a tensor" in err and "quantized" not in err
    assert main([str(path), str(tmp_path / "o.msgpack"), "--rename", "^note$="]) == 0
    capsys.readouterr()
    q = tmp_path / "q.pt"
    torch.save({"fc.weight_dtype": torch.qint8}, q)
    assert "holds the torch dtype/qscheme name 'qint8'" in _cli_error(capsys, q, tmp_path / "o.msgpack")


@pytest.mark.parametrize("meta,expect", [([1, 2], "key 'jquant' must hold the conversion record"),
                                         ({"mapping": 5}, "'mapping' must be a JSON string, got int"),
                                         ({"extras": [1]}, "key 'jquant/extras' must be a dict")])
def test_msgpack_with_a_bad_jquant_record(tmp_path, capsys, meta, expect):
    path = tmp_path / "p.msgpack"
    path.write_bytes(serialization.msgpack_serialize({"variables": {"params": {"a": np.ones(2)}}, "jquant": meta}))
    err = _cli_error(capsys, path, tmp_path / "back.safetensors", "--to-torch")
    assert "p.msgpack" in err and expect in err
