"""Concrete qparams and int4 values are checked instead of giving constant, NaN or wrapped results
(issue #12, item 9). Traced values cannot be checked; that case is documented in the functions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant

X = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)


@pytest.mark.parametrize("zp", [300, -1])
def test_zero_point_outside_range_raises_per_tensor(zp):
    with pytest.raises(ValueError, match=rf"zero_point: {zp} lies outside \[quant_min, quant_max\] = \[0, 255\]"):
        jquant.fake_quantize_per_tensor_affine(X, 0.1, zp, 0, 255)


def test_zero_point_outside_range_raises_per_channel_and_affine():
    zp = np.array([0, 0, 0, 200], np.int32)
    with pytest.raises(ValueError, match=r"zero_point: 200 lies outside .* \[-128, 127\]"):
        jquant.fake_quantize_per_channel_affine(X, np.full(4, 0.1), zp, 1, -128, 127)
    with pytest.raises(ValueError, match=r"zero_point: 200 lies outside"):
        jquant.fake_quantize_affine(X, np.full(4, 0.1), zp, dtype="int8", axis=1)
    with pytest.raises(ValueError, match=r"zero_point: 200 lies outside"):
        jquant.quantize_affine(X, np.full(4, 0.1), zp, dtype="int8", axis=1)


def test_float_zero_point_is_not_range_checked_as_in_torch():
    y = jquant.fake_quantize_per_channel_affine(X, np.full(4, 0.1), np.array([0, 0, 0, 300.0]), 1, 0, 255)
    assert np.all(np.isfinite(np.asarray(y)))


def test_traced_zero_point_is_not_checked():
    f = jax.jit(lambda zp: jquant.fake_quantize_per_tensor_affine(X, 0.1, zp, 0, 255))
    assert f(jnp.int32(300)).shape == X.shape  # documented: clamped, constant output under jit


@pytest.mark.parametrize("scale", [1e-40, np.float32(1e-39)])
def test_subnormal_scale_raises(scale):
    with pytest.raises(ValueError, match=r"scale: .* is subnormal in float32"):
        jquant.fake_quantize_per_tensor_affine(X, scale, 0, -128, 127)
    with pytest.raises(ValueError, match=r"is subnormal"):
        jquant.quantize_affine(X, scale, 0, dtype="int8")


@pytest.mark.parametrize("scale", [np.inf, np.nan])
def test_non_finite_scale_raises(scale):
    with pytest.raises(ValueError, match=r"scale: every scale must be > 0 and finite, got (inf|nan)"):
        jquant.fake_quantize_affine(X, scale, 0)


def test_pack_int4_refuses_values_that_would_wrap():
    with pytest.raises(ValueError, match=r"pack_int4 got 100, outside the int4 range \[-8, 7\]"):
        jquant.pack_int4(np.array([1, 100], np.int8))
    with pytest.raises(ValueError, match=r"pack_int4 got 16, outside the uint4 range \[0, 15\]"):
        jquant.pack_int4(np.array([16, 3], np.uint8))
    q = np.array([-8, 7, 0, -1], np.int8)
    np.testing.assert_array_equal(jquant.unpack_int4(jquant.pack_int4(q)), q)
