"""bf16 / f16 inputs: fake quant, quantize and LSQ compute in float32, round once and return the input dtype,
bit for bit as torch does (issue #12, item 4)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import jquant

DTYPES = {"bfloat16": (torch.bfloat16, ml_dtypes.bfloat16), "float16": (torch.float16, np.float16)}


def _inputs(rng, np_dtype, shape=(64, 96)):
    x = (rng.standard_normal(shape) * 3).astype(np.float32).astype(np_dtype)
    scale = rng.uniform(0.01, 0.05, shape[1]).astype(np.float32)
    return x, scale


def _to_torch(x, t_dtype):
    return torch.from_numpy(np.asarray(x, np.float32)).to(t_dtype)


def _from_torch(t):
    return t.float().numpy()


@pytest.mark.parametrize("name", list(DTYPES))
def test_fake_quant_per_tensor_and_per_channel_equal_torch(rng, name):
    t_dtype, np_dtype = DTYPES[name]
    x, scale = _inputs(rng, np_dtype)
    zp = rng.integers(-20, 20, scale.shape).astype(np.int32)
    tx = _to_torch(x, t_dtype)
    want_t = torch.fake_quantize_per_tensor_affine(tx, float(scale[0]), 3, -128, 127)
    got_t = jquant.fake_quantize_per_tensor_affine(jnp.asarray(x), scale[0], 3, -128, 127)
    assert got_t.dtype == jnp.dtype(np_dtype)
    np.testing.assert_array_equal(np.asarray(got_t, np.float32), _from_torch(want_t))
    want_c = torch.fake_quantize_per_channel_affine(
        tx, torch.from_numpy(scale), torch.from_numpy(zp), 1, -128, 127
    )
    got_c = jquant.fake_quantize_per_channel_affine(jnp.asarray(x), scale, zp, 1, -128, 127)
    assert got_c.dtype == jnp.dtype(np_dtype)
    np.testing.assert_array_equal(np.asarray(got_c, np.float32), _from_torch(want_c))
    got_a = jquant.fake_quantize_affine(jnp.asarray(x), scale, zp, dtype="int8", axis=1)
    np.testing.assert_array_equal(np.asarray(got_a, np.float32), _from_torch(want_c))


@pytest.mark.parametrize("name", list(DTYPES))
def test_quantize_equals_torch_per_channel(rng, name):
    """torch.quantize_per_channel takes float32 only: the bf16/f16 values upcast exactly."""
    t_dtype, np_dtype = DTYPES[name]
    x, scale = _inputs(rng, np_dtype)
    tq = torch.quantize_per_channel(
        _to_torch(x, t_dtype).float(), torch.from_numpy(scale).double(), torch.zeros(scale.size, dtype=torch.int64),
        1, torch.qint8,
    )
    got = jquant.quantize_affine(jnp.asarray(x), scale, np.zeros(scale.size, np.int32), dtype="int8", axis=1)
    np.testing.assert_array_equal(np.asarray(got), tq.int_repr().numpy())


@pytest.mark.parametrize("name", list(DTYPES))
def test_lsq_returns_input_dtype_and_equals_torch(rng, name):
    t_dtype, np_dtype = DTYPES[name]
    x, scale = _inputs(rng, np_dtype)
    tx = _to_torch(x, t_dtype)
    want = torch._fake_quantize_learnable_per_tensor_affine(
        tx, torch.tensor([float(scale[0])]), torch.tensor([2.0]), -128, 127, 1.0
    )
    got = jquant.fake_quantize_learnable_per_tensor_affine(jnp.asarray(x), scale[0], 2.0, -128, 127)
    assert got.dtype == jnp.dtype(np_dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), _from_torch(want))
    want_c = torch._fake_quantize_learnable_per_channel_affine(
        tx, torch.from_numpy(scale), torch.zeros(scale.size), 1, -128, 127, 1.0
    )
    got_c = jquant.fake_quantize_learnable_per_channel_affine(jnp.asarray(x), scale, np.zeros(scale.size), 1, -128, 127)
    assert got_c.dtype == jnp.dtype(np_dtype)
    np.testing.assert_array_equal(np.asarray(got_c, np.float32), _from_torch(want_c))
