"""Integer kernels: weight quantization, exact int32 accumulation, agreement with fake-quant, torch parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from jquant.kernels import (
    dynamic_int8_conv,
    dynamic_int8_dot_general,
    int8_conv,
    int8_dot_general,
    int8_matmul,
    quantize_weight,
    tree_nbytes,
    weight_only_dot_general,
)
from jquant.numerics.affine import fake_quantize_affine
from jquant.numerics.qparams import choose_qparams

DENSE = (((1,), (0,)), ((), ()))
RNG = np.random.default_rng(0)


def _jit(fn, *args):
    """Run ``fn`` jitted: one compilation instead of one per eager op (keeps the suite fast)."""
    return jax.jit(fn)(*args)


def _normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def test_int8_weight_matches_torch_quantize_per_channel():
    w = _normal(16, 24)  # torch layout (out, in)
    obs = torch.ao.quantization.PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8,
                                                         qscheme=torch.per_channel_symmetric)
    tw = torch.tensor(np.asarray(w))
    obs(tw)
    t_scale, t_zp = obs.calculate_qparams()
    t_q = torch.quantize_per_channel(tw, t_scale, t_zp, 0, torch.qint8).int_repr().numpy()
    qw = quantize_weight(w, axis=0)
    np.testing.assert_array_equal(np.asarray(qw.scale).reshape(-1), t_scale.numpy().astype(np.float32))
    np.testing.assert_array_equal(np.asarray(qw.qvalue), t_q)
    assert qw.qvalue.dtype == jnp.int8 and qw.zero_point is None


def test_int4_groupwise_packed_bytes_and_values():
    w = _normal(256, 64)  # (in, out), groups along the contracted axis 0
    qw = quantize_weight(w, dtype="int4", axis=-1, group_size=32, group_axis=0)
    assert qw.packed and qw.qvalue.dtype == jnp.uint8 and qw.qvalue.size == w.size // 2
    assert qw.scale.shape == (8, 64)
    vals = np.asarray(qw.int_values())
    assert vals.min() >= -8 and vals.max() <= 7
    expected = fake_quantize_affine(w, qw.scale, jnp.zeros_like(qw.scale, jnp.int32), dtype="int4",
                                    block_size=(32, 1))
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), np.asarray(expected))
    assert w.nbytes / tree_nbytes(qw) > 6.0  # f32 scales per group of 32
    assert w.nbytes / tree_nbytes(quantize_weight(w, dtype="int4", group_size=128, group_axis=0)) > 7.4
    assert w.nbytes / tree_nbytes(quantize_weight(w, axis=-1)) > 3.9


def test_int8_matmul_accumulation_is_exact():
    x = RNG.integers(-128, 128, (3, 2048)).astype(np.int8)
    x[0] = -128
    w = RNG.integers(-128, 128, (2048, 40)).astype(np.int8)
    w[:, 0] = -128  # extreme products: 2048 * 128 * 128 = 2**25, beyond float32's exact integers
    ref = x.astype(np.int64) @ w.astype(np.int64)
    for rows in (1, 3):
        for pad in (True, False):
            got = int8_matmul(jnp.asarray(x[:rows]), jnp.asarray(w), pad_batch_one=pad)
            assert got.dtype == jnp.int32
            np.testing.assert_array_equal(np.asarray(got, np.int64), ref[:rows])


def test_static_dot_zero_point_correction_is_exact_integer_math():
    # Unit scales: the float output is the corrected int32 accumulator itself (values < 2**24).
    xq = RNG.integers(0, 256, (4, 96)).astype(np.int32)
    wq = RNG.integers(-127, 128, (96, 8)).astype(np.int32)
    zp = 131
    qw = quantize_weight(jnp.asarray(wq, jnp.float32), axis=-1, scale=jnp.ones((1, 8)), contracting_axes=(0,))
    got = int8_dot_general(jnp.asarray(xq - zp, jnp.float32), qw, DENSE, act_scale=1.0, act_zero_point=zp)
    ref = (xq.astype(np.int64) - zp) @ wq.astype(np.int64)
    np.testing.assert_array_equal(np.asarray(got, np.int64), ref)


@pytest.mark.parametrize("rows,act_dtype", [(1, "uint8"), (7, "int8")])
def test_static_dot_matches_fake_quant_within_one_output_step(rows, act_dtype):
    x, w, b = _normal(rows, 64), _normal(64, 48), _normal(48)
    x_scale, x_zp = choose_qparams(x.min(), x.max(), dtype=act_dtype)
    qw = quantize_weight(w, axis=-1, contracting_axes=(0,))
    reference = fake_quantize_affine(x, x_scale, x_zp, dtype=act_dtype) @ qw.dequantize() + b
    out_scale, out_zp = choose_qparams(reference.min(), reference.max(), dtype="uint8")
    got_float, got_q = _jit(lambda x, qw: (
        int8_dot_general(x, qw, DENSE, act_scale=x_scale, act_zero_point=x_zp, act_dtype=act_dtype, bias=b),
        int8_dot_general(x, qw, DENSE, act_scale=x_scale, act_zero_point=x_zp, act_dtype=act_dtype, bias=b,
                         out_scale=out_scale, out_zero_point=out_zp),
    ), x, qw)
    np.testing.assert_allclose(got_float, reference, atol=float(out_scale), rtol=0)
    ref_q = jnp.clip(jnp.round(reference / out_scale) + out_zp, 0, 255)
    assert got_q.dtype == jnp.uint8
    assert np.abs(np.asarray(got_q, np.int32) - np.asarray(ref_q, np.int32)).max() <= 1


def test_static_dot_other_layouts_and_weight_side():
    x = _normal(2, 5, 32)
    w = _normal(4, 32, 6)  # einsum "bsd,hdk->bshk"-like weight: contract d, free (h, k)
    qw = quantize_weight(w, axis=None)
    xs, xz = choose_qparams(x.min(), x.max(), dtype="uint8")
    fq = fake_quantize_affine(x, xs, xz, dtype="uint8")
    ref = lax.dot_general(fq, qw.dequantize(), (((2,), (1,)), ((), ())))
    ref_lhs = lax.dot_general(qw.dequantize(), fq, (((1,), (2,)), ((), ())))
    got, got_lhs = _jit(lambda x, qw: (
        int8_dot_general(x, qw, (((2,), (1,)), ((), ())), act_scale=xs, act_zero_point=xz),
        int8_dot_general(x, qw, (((1,), (2,)), ((), ())), act_scale=xs, act_zero_point=xz, weight_side="lhs"),
    ), x, qw)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert got_lhs.shape == ref_lhs.shape == (4, 6, 2, 5)
    np.testing.assert_allclose(got_lhs, ref_lhs, atol=1e-4)


def test_dynamic_dot_matches_per_token_fake_quant():
    x, w = _normal(5, 64) * jnp.arange(1, 6)[:, None], _normal(64, 16)
    qw = quantize_weight(w, axis=-1)

    def both(x, qw):
        scale, zp = choose_qparams(x.min(axis=1), x.max(axis=1), dtype="int8", qscheme="per_channel_symmetric")
        ref = fake_quantize_affine(x, scale, zp, dtype="int8", axis=0) @ qw.dequantize()
        scale_t, zp_t = choose_qparams(x.min(), x.max(), dtype="uint8")
        ref_t = fake_quantize_affine(x, scale_t, zp_t, dtype="uint8") @ qw.dequantize()
        got = dynamic_int8_dot_general(x, qw, DENSE)
        got_t = dynamic_int8_dot_general(x, qw, DENSE, per_token=False, symmetric=False)
        return got, ref, got_t, ref_t

    got, ref, got_t, ref_t = _jit(both, x, qw)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(got_t, ref_t, atol=1e-4)


@pytest.mark.parametrize("dtype,group", [("int8", None), ("int4", 16)])
def test_weight_only_dot(dtype, group):
    x, w, b = _normal(3, 64), _normal(64, 24), _normal(24)
    qw = quantize_weight(w, dtype=dtype, axis=-1, group_size=group, group_axis=0 if group else None)
    exact, slow, fast = _jit(lambda x, qw: (
        x @ qw.dequantize() + b,
        weight_only_dot_general(x, qw, DENSE, bias=b, impl="dequantize"),
        weight_only_dot_general(x, qw, DENSE, bias=b, impl="dynamic"),
    ), x, qw)
    np.testing.assert_allclose(slow, exact, rtol=1e-5, atol=1e-5)
    # the dynamic path adds one per-row int8 rounding of the activation: error ~ |x|_max / 255 * ||w||_1
    bound = float(jnp.max(jnp.abs(x)) / 255 * jnp.max(jnp.sum(jnp.abs(qw.dequantize()), axis=0)))
    assert float(jnp.max(jnp.abs(fast - exact))) < bound


CONV_CASES = [
    dict(strides=(1, 1), padding="SAME", rhs_dilation=(1, 1), lhs_dilation=(1, 1), groups=1),
    dict(strides=(2, 1), padding="VALID", rhs_dilation=(1, 2), lhs_dilation=(1, 1), groups=1),
    dict(strides=(1, 2), padding=((2, 1), (1, 2)), rhs_dilation=(1, 1), lhs_dilation=(2, 2), groups=1),
    dict(strides=(1, 1), padding="SAME", rhs_dilation=(1, 1), lhs_dilation=(1, 1), groups=4),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_static_conv_matches_fake_quant(case):
    groups = case["groups"]
    x, w, b = _normal(2, 9, 10, 4), _normal(3, 3, 4 // groups, 8), _normal(8)
    xs, xz = choose_qparams(x.min(), x.max(), dtype="uint8")
    qw = quantize_weight(w, axis=-1)
    dn = ("NHWC", "HWIO", "NHWC")
    kw = dict(lhs_dilation=case["lhs_dilation"], rhs_dilation=case["rhs_dilation"], dimension_numbers=dn,
              feature_group_count=groups)
    ref = lax.conv_general_dilated(fake_quantize_affine(x, xs, xz, dtype="uint8"), qw.dequantize(),
                                   case["strides"], case["padding"], **kw) + b
    impls = ["im2col", "conv"] if groups == 1 else ["conv"]
    for impl in impls:
        got = _jit(lambda x, qw, impl=impl: int8_conv(x, qw, case["strides"], case["padding"], **kw, act_scale=xs,
                                                      act_zero_point=xz, bias=b, impl=impl), x, qw)
        assert got.shape == ref.shape
        # int32 bias rounding: at most half a derived step (act_scale * w_scale) per output
        np.testing.assert_allclose(got, ref, atol=float(xs * qw.scale.max()), rtol=0)


def test_conv_nchw_and_dynamic():
    x, w = _normal(2, 3, 8, 8), _normal(5, 3, 3, 3)  # torch layouts NCHW / OIHW
    qw = quantize_weight(w, axis=0)
    xs, xz = choose_qparams(x.min(), x.max(), dtype="uint8")
    fq = fake_quantize_affine(x, xs, xz, dtype="uint8")
    ref = lax.conv_general_dilated(fq, qw.dequantize(), (1, 1), "SAME")
    got, dyn = _jit(lambda x, qw: (int8_conv(x, qw, (1, 1), "SAME", act_scale=xs, act_zero_point=xz),
                                   dynamic_int8_conv(x, qw, (1, 1), "SAME")), x, qw)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    np.testing.assert_allclose(dyn, ref, atol=1e-4)  # the dynamic qparams equal the per-tensor ones here


def test_static_linear_matches_torch_quantized_linear():
    """torch's own int8 runtime (x86/fbgemm quantized::linear) is the oracle, within one output step.

    Activations use torch's x86 reduce_range (quint8 in 0..127): on CPUs without VNNI fbgemm multiplies with the
    saturating ``vpmaddubsw``, which is exact only for 7-bit activations (full-range ones were 76 steps off here).
    """
    x, w, b = _normal(6, 32), _normal(16, 32), _normal(16)  # torch layout
    xs, xz = choose_qparams(x.min(), x.max(), dtype="uint8", quant_min=0, quant_max=127)
    qw = quantize_weight(w, axis=0)
    out_scale, out_zp = 0.05, 120
    ql = torch.ao.nn.quantized.Linear(32, 16)
    t_scale = torch.tensor(np.asarray(qw.scale[:, 0])).double()
    tq_w = torch.quantize_per_channel(torch.tensor(np.asarray(w)), t_scale, torch.zeros(16, dtype=torch.int64), 0,
                                      torch.qint8)
    ql.set_weight_bias(tq_w, torch.from_numpy(np.asarray(b)))
    ql.scale, ql.zero_point = out_scale, out_zp
    tx = torch.quantize_per_tensor(torch.from_numpy(np.asarray(x)), float(xs), int(xz), torch.quint8)
    expected = ql(tx).int_repr().numpy().astype(np.int32)
    got = int8_dot_general(x, qw, (((1,), (1,)), ((), ())), act_scale=xs, act_zero_point=xz, act_quant_min=0,
                           act_quant_max=127, bias=b, out_scale=out_scale, out_zero_point=out_zp)
    assert np.abs(np.asarray(got, np.int32) - expected).max() <= 1


def test_errors_name_the_culprit():
    qw = quantize_weight(_normal(8, 4), axis=-1)
    with pytest.raises(ValueError, match="batch dims"):
        int8_dot_general(_normal(2, 3, 8), qw, (((2,), (0,)), ((0,), (1,))), act_scale=0.1)
    with pytest.raises(ValueError, match="act_scale"):
        int8_dot_general(_normal(2, 8), qw, DENSE, act_scale=jnp.ones(2))
    with pytest.raises(ValueError, match="dtype"):
        quantize_weight(_normal(8, 4), dtype="int16")
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight(_normal(8, 4), group_size=3, group_axis=0)
    with pytest.raises(ValueError, match="impl"):
        weight_only_dot_general(_normal(2, 8), qw, DENSE, impl="fast")


def test_kernels_work_under_jit():
    x, w = _normal(4, 32), _normal(32, 8)
    qw = quantize_weight(w, axis=-1, contracting_axes=(0,))
    f = jax.jit(lambda p, v: int8_dot_general(v, p, DENSE, act_scale=0.03, act_zero_point=128))
    np.testing.assert_array_equal(f(qw, x), int8_dot_general(x, qw, DENSE, act_scale=0.03, act_zero_point=128))


def test_quantized_weight_granularity_is_derived_from_block_size():
    w = _normal(64, 6)
    per_channel = quantize_weight(w, dtype="int8", axis=-1)
    grouped = quantize_weight(w, dtype="int4", axis=-1, group_size=16, group_axis=0)
    per_tensor = quantize_weight(w, dtype="int8", axis=None)
    assert (per_channel.block_size, per_channel.axis, per_channel.group_axis) == ((64, 1), 1, None)
    assert (grouped.block_size, grouped.axis, grouped.group_axis, grouped.group_size) == ((16, 1), 1, 0, 16)
    assert (per_tensor.block_size, per_tensor.axis, per_tensor.group_size) == ((64, 6), None, None)
