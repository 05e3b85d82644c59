"""load_int_params validates what it reads: crafted files give ValueErrors naming the file and the entry, never
raw KeyError / TypeError / RecursionError nor an inconsistent QuantizedWeight (issue #12, item 11)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jquant import load_int_params, save_int_params
from jquant.kernels import quantize_weight

FORMAT = "jquant.int_params.v1"


def _write(tmp_path, tree, tensors=None, fmt=FORMAT):
    path = tmp_path / "p.safetensors"
    meta = {"format": fmt}
    if tree is not None:
        meta["tree"] = tree if isinstance(tree, str) else json.dumps(tree)
    save_file(tensors or {"t": np.ones(2, np.float32)}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "tree,expect",
    [
        (None, "the metadata has no 'tree' skeleton"),
        ("{not json", "the stored tree skeleton is not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "the stored tree skeleton is not valid JSON"),
        (5, r"entry <root>: expected a node object .* got int"),
        ({"__tensor__": "missing", "shape": [2]}, r"entry <root>: refers to tensor 'missing'"),
        ({"__dict__": {"w": {"__tensor__": "t", "shape": [5, 5]}}}, r"entry <root>/w: tensor 't' holds 2 values"),
        ({"__dict__": {"w": {"__tensor__": "t", "shape": "2"}}}, r"entry <root>/w: 'shape' must be a list"),
        ({"__list__": {"a": 1}}, r"'__list__' must hold an array"),
        ({"__mystery__": 1}, r"unknown node \['__mystery__'\]"),
    ],
)
def test_malformed_skeletons(tmp_path, tree, expect):
    path = _write(tmp_path, tree)
    with pytest.raises(ValueError, match=expect) as info:
        load_int_params(path)
    assert str(path) in str(info.value)


def test_deep_nesting_is_an_error_not_a_recursion_error(tmp_path):
    tree = {"__tensor__": "t", "shape": [2]}
    for _ in range(400):
        tree = {"__list__": [tree]}
    with pytest.raises(ValueError, match="nested more than 256 levels deep"):
        load_int_params(_write(tmp_path, tree))


def _qw_spec(**overrides):
    spec = {
        "qvalue": {"__tensor__": "q", "shape": [2]},
        "scale": {"__tensor__": "s", "shape": [1]},
        "zero_point": None,
        "dtype": "int8",
        "shape": [5, 5],
        "block_size": [5, 1],
        "axis": 7,
    }
    spec.update(overrides)
    return {"__dict__": {"layer": {"__quantized_weight__": spec}}}


def test_inconsistent_quantized_weight_is_refused(tmp_path):
    tensors = {"q": np.ones(2, np.int8), "s": np.ones(1, np.float32)}
    path = _write(tmp_path, _qw_spec(), tensors)
    with pytest.raises(ValueError, match=r"p.safetensors: entry <root>/layer: inconsistent QuantizedWeight: axis 7 "
                                         r"is out of range for shape \(5, 5\)"):
        load_int_params(path)
    path = _write(tmp_path, _qw_spec(axis=1), tensors)
    with pytest.raises(ValueError, match=r"qvalue is int8\(2,\), the declared shape \(5, 5\) needs int8\(5, 5\)"):
        load_int_params(path)


@pytest.mark.parametrize(
    "overrides,expect",
    [
        ({"dtype": "int3"}, "dtype 'int3' is not one of"),
        ({"shape": "5x5"}, r"field 'shape' must be tuple\[int, \.\.\.\]"),
        ({"frobnicate": 1}, r"has no field\(s\) \['frobnicate'\]"),
        ({"qvalue": 3}, r"<root>/layer.qvalue: expected a tensor or null"),
        ({"block_size": [3, 1], "axis": 1}, r"block_size \(3, 1\) does not divide shape \(5, 5\)"),
    ],
)
def test_bad_quantized_weight_fields(tmp_path, overrides, expect):
    path = _write(tmp_path, _qw_spec(**overrides), {"q": np.ones(2, np.int8), "s": np.ones(1, np.float32)})
    with pytest.raises(ValueError, match=expect):
        load_int_params(path)


def test_missing_required_field(tmp_path):
    spec = _qw_spec()
    del spec["__dict__"]["layer"]["__quantized_weight__"]["scale"]
    with pytest.raises(ValueError, match=r"QuantizedWeight field\(s\) \['scale'\] are missing"):
        load_int_params(_write(tmp_path, spec, {"q": np.ones(2, np.int8)}))


def test_valid_files_still_load(tmp_path):
    w = jnp.asarray(np.random.default_rng(0).standard_normal((16, 8)), jnp.float32)
    params = {"a": quantize_weight(w, axis=-1, contracting_axes=(0,)),
              "b": quantize_weight(w, dtype="int4", axis=-1, group_size=8, group_axis=0), "c": (None, [1.5])}
    save_int_params(tmp_path / "ok.safetensors", params)
    back = load_int_params(tmp_path / "ok.safetensors")
    np.testing.assert_array_equal(back["b"].qvalue, params["b"].qvalue)
    assert back["b"].packed and back["a"].axis == 1
