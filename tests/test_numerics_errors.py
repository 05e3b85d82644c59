"""Bad input raises clear errors that name the argument and the allowed values."""

import numpy as np
import pytest

import jquant
from jquant.numerics.qschemes import canonical_qscheme


def test_unknown_dtype_names_allowed_values():
    with pytest.raises(ValueError, match=r"dtype: unknown quantized dtype 'int7'.*int8"):
        jquant.choose_qparams(0.0, 1.0, dtype="int7")


def test_unknown_qscheme_names_allowed_values():
    with pytest.raises(ValueError, match=r"qscheme: unknown qscheme 'per_row'.*per_tensor_affine"):
        canonical_qscheme("per_row")
    with pytest.raises(ValueError, match="qscheme"):
        jquant.choose_qparams(0.0, 1.0, qscheme="per_row")


@pytest.mark.parametrize("qmin,qmax", [(5, 5), (10, -3)])
def test_bad_quant_range(qmin, qmax):
    with pytest.raises(ValueError, match="quant_min < quant_max"):
        jquant.qrange("int8", qmin, qmax)
    with pytest.raises(ValueError, match="quant_min < quant_max"):
        jquant.fake_quantize_per_tensor_affine(np.ones(3, np.float32), 0.1, 0, qmin, qmax)


def test_range_outside_dtype():
    with pytest.raises(ValueError, match="outside the int8 range"):
        jquant.qrange("int8", -200, 100)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="axis: 3 is out of range"):
        jquant.fake_quantize_per_channel_affine(
            np.ones((2, 3), np.float32), np.ones(2), np.zeros(2, np.int32), 3, 0, 255
        )


def test_nonpositive_scale():
    with pytest.raises(ValueError, match="scale: every scale must be > 0"):
        jquant.fake_quantize_per_tensor_affine(np.ones(3, np.float32), 0.0, 0, -128, 127)
    with pytest.raises(ValueError, match="scale"):
        jquant.quantize_affine(np.ones(3, np.float32), -1.0, 0, dtype="int8")


def test_mismatched_scale_shape():
    x = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match=r"scale: per-channel fake quant on axis 1 .* needs shape \(6,\)"):
        jquant.fake_quantize_per_channel_affine(x, np.ones(4), np.zeros(4, np.int32), 1, -128, 127)
    with pytest.raises(ValueError, match=r"scale: shape \(2,\) does not match the input shape \(4, 6\)"):
        jquant.quantize_affine(x, np.ones(2), np.zeros(2, np.int32), dtype="int8", block_size=(4, 2))
    with pytest.raises(ValueError, match="block_size: entry 4 at dim 1 does not divide"):
        jquant.quantize_affine(x, np.ones(1), 0, dtype="int8", block_size=(4, 4))


def test_empty_array():
    with pytest.raises(ValueError, match="x: empty array"):
        jquant.fake_quantize_affine(np.zeros((0, 3), np.float32), 0.1, 0)


def test_non_float_input():
    with pytest.raises(TypeError, match="x: expected a floating-point array"):
        jquant.quantize_affine(np.ones(3, np.int32), 0.1, 0, dtype="int8")
