"""Converted params survive safetensors; int8 functions export to StableHLO and run in a fresh process."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import export_int_fn, load_exported, load_int_params, save_int_params
from jquant.kernels import int8_dot_general, quantize_weight

DENSE = (((1,), (0,)), ((), ()))


def _params():
    rng = np.random.default_rng(1)
    w1 = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
    return {
        "l1": {"kernel": quantize_weight(w1, axis=-1, contracting_axes=(0,)), "bias": jnp.ones(16)},
        "l2": {"kernel": quantize_weight(w2, dtype="int4", axis=-1, group_size=8, group_axis=0)},
        "extra": [None, (jnp.arange(3),)],
    }


def int_mlp(params, x):
    h = int8_dot_general(x, params["l1"]["kernel"], DENSE, act_scale=0.02, act_zero_point=128,
                         bias=params["l1"]["bias"])
    h = jax.nn.relu(h)
    return int8_dot_general(h, params["l2"]["kernel"], DENSE, act_scale=0.05, act_zero_point=0)


def test_safetensors_round_trip(tmp_path):
    params = _params()
    path = tmp_path / "int_params.safetensors"
    save_int_params(path, params)
    loaded = load_int_params(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert loaded["l2"]["kernel"].packed and loaded["l2"]["kernel"].block_size == (8, 1)
    x = jnp.linspace(-1, 1, 64).reshape(2, 32)
    np.testing.assert_array_equal(int_mlp(loaded, x), int_mlp(params, x))


def test_save_rejects_unknown_nodes(tmp_path):
    with pytest.raises(TypeError, match="cannot save"):
        save_int_params(tmp_path / "x.safetensors", {"fn": print})
    with pytest.raises(TypeError, match="not a string"):
        save_int_params(tmp_path / "x.safetensors", {1: jnp.ones(2)})


def test_export_contains_int8_ops_and_runs_in_fresh_process(tmp_path):
    params = _params()
    x = jnp.linspace(-1, 1, 64).reshape(2, 32)
    blob = export_int_fn(int_mlp, params, x)
    text = load_exported(blob).exported.mlir_module()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert any("xi8>" in d and "xi32>" in d.split("->")[-1] for d in dots), dots
    (tmp_path / "fn.bin").write_bytes(blob)
    save_int_params(tmp_path / "params.safetensors", params)
    np.save(tmp_path / "x.npy", np.asarray(x))
    script = textwrap.dedent(f"""
        import numpy as np
        from jquant import load_exported, load_int_params
        fn = load_exported(open({str(tmp_path / 'fn.bin')!r}, 'rb').read())
        params = load_int_params({str(tmp_path / 'params.safetensors')!r})
        np.save({str(tmp_path / 'y.npy')!r}, np.asarray(fn(params, np.load({str(tmp_path / 'x.npy')!r}))))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(jax.jit(int_mlp)(params, x)))


def test_load_exported_refuses_foreign_bytes():
    with pytest.raises(ValueError, match="blob: not a serialized jax.export function"):
        load_exported(b"\x00\x01 not an exported function")
