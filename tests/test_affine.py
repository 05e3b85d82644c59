"""quantize_affine / dequantize_affine / packing: torch parity where torch defines it, and properties."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import jquant


def test_quantize_per_channel_symmetric_equals_torch(rng):
    w = (rng.standard_normal((64, 300)) * 0.2).astype(np.float32)
    scale = (np.abs(w).max(axis=1) / 127.5).astype(np.float32)
    zp = np.zeros(64, np.int32)
    tq = torch.quantize_per_channel(
        torch.tensor(w), torch.tensor(scale, dtype=torch.float64), torch.tensor(zp), 0, torch.qint8
    )
    q = jquant.quantize_affine(w, scale, zp, dtype="int8", axis=0)
    assert q.dtype == jnp.int8
    assert np.array_equal(np.asarray(q), tq.int_repr().numpy())
    assert np.array_equal(np.asarray(jquant.dequantize_affine(q, scale, zp, axis=0)), tq.dequantize().numpy())


def test_quantize_per_tensor_zero_zp_equals_torch(rng):
    x = (rng.standard_normal(100_000) * 3).astype(np.float32)
    scale = np.float32(0.0231)
    tq = torch.quantize_per_tensor(torch.tensor(x), float(scale), 0, torch.qint8)
    q = jax.jit(lambda v: jquant.quantize_affine(v, scale, 0, dtype="int8"))(x)
    assert np.array_equal(np.asarray(q), tq.int_repr().numpy())


def test_dequantize_of_quantize_equals_fake_quant_bitwise(rng):
    x = (rng.standard_normal((16, 128)) * 3).astype(np.float32)
    scale = rng.uniform(0.01, 0.05, 16).astype(np.float32)
    zp = rng.integers(0, 255, 16).astype(np.int32)
    q = jquant.quantize_affine(x, scale, zp, dtype="uint8", axis=0)
    assert q.dtype == jnp.uint8
    roundtrip = jquant.dequantize_affine(q, scale, zp, axis=0)
    fq = jquant.fake_quantize_affine(x, scale, zp, dtype="uint8", axis=0)
    assert np.array_equal(np.asarray(roundtrip), np.asarray(fq))


def test_groupwise_int4_equals_manual_per_group(rng):
    w = rng.standard_normal((8, 128)).astype(np.float32)
    group = 32
    blocks = w.reshape(8, 4, group)
    scale = (np.abs(blocks).max(-1) / 7).astype(np.float32)  # (8, 4)
    q = jquant.quantize_affine(w, scale, np.zeros_like(scale, np.int32), dtype="int4", block_size=(1, group))
    manual = np.clip(np.round(blocks * (np.float32(1) / scale)[..., None]), -8, 7).reshape(8, 128)
    assert np.array_equal(np.asarray(q), manual.astype(np.int8))
    deq = jquant.dequantize_affine(q, scale, None, block_size=(1, group))
    assert np.abs(np.asarray(deq) - w).max() <= scale.max() / 2 + 1e-6


def test_pack_unpack_int4_round_trip(rng):
    q = rng.integers(-8, 8, (6, 10)).astype(np.int8)
    packed = jquant.pack_int4(q)
    assert packed.dtype == jnp.uint8 and packed.shape == (6, 5)
    assert np.array_equal(np.asarray(jquant.unpack_int4(packed)), q)
    u = rng.integers(0, 16, (4, 8)).astype(np.uint8)
    packed0 = jquant.pack_int4(u, axis=0)
    assert packed0.shape == (2, 8)
    assert np.array_equal(np.asarray(jquant.unpack_int4(packed0, axis=0, signed=False)), u)
    # torchao/gpt-fast order: element 2i in the low nibble
    assert int(jquant.pack_int4(np.array([1, 2], np.int8))[0]) == 0x21


def test_float8_fake_quant_round_trips_through_float8(rng):
    x = (rng.standard_normal(1000) * 10).astype(np.float32)
    scale = np.float32(np.abs(x).max() / 448.0)
    q = jquant.quantize_affine(x, scale, None, dtype="float8_e4m3fn")
    assert q.dtype == jnp.float8_e4m3fn
    fq = jquant.fake_quantize_affine(x, scale, None, dtype="float8_e4m3fn")
    want = (torch.tensor(x) / float(scale)).to(torch.float8_e4m3fn).float() * float(scale)
    np.testing.assert_allclose(np.asarray(fq), want.numpy(), rtol=1e-6)
    assert np.array_equal(np.asarray(jquant.dequantize_affine(q, scale, None)), np.asarray(fq))


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    x=arrays(np.float32, st.integers(1, 64), elements=finite),
    scale=st.floats(0.0009765625, 10.0, width=32),
    zp=st.integers(-128, 127),
)
def test_properties_error_bound_monotone_idempotent(x, scale, zp):
    qmin, qmax = -128, 127
    fq = np.asarray(jquant.fake_quantize_affine(x, scale, zp, dtype="int8"))
    lo, hi = (qmin - zp) * np.float32(scale), (qmax - zp) * np.float32(scale)
    inside = (x >= lo) & (x <= hi)
    # within scale/2 inside the range (plus float32 rounding of the product)
    assert np.all(np.abs(fq - x)[inside] <= np.float32(scale) / 2 * (1 + 1e-5) + 1e-6 * np.abs(x[inside]))
    # monotone: sorting the input sorts the output
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(fq[order]) >= 0)
    # idempotent
    again = np.asarray(jquant.fake_quantize_affine(fq, scale, zp, dtype="int8"))
    assert np.array_equal(again, fq)


def test_float8_fake_quant_gradient_is_straight_through_inside_the_range():
    scale = np.float32(0.5)
    x = np.array([-1000.0, -1.0, 0.3, 100.0, 1000.0], np.float32)  # e4m3fn max 448 -> range +-224
    grad = jax.grad(lambda v: jquant.fake_quantize_affine(v, scale, None, dtype="float8_e4m3fn").sum())(x)
    assert np.array_equal(np.asarray(grad), [0.0, 1.0, 1.0, 1.0, 0.0])
    blockwise = jquant.fake_quantize_affine(
        np.tile(x, (2, 1)), np.array([[0.5], [2.0]], np.float32), None, dtype="float8_e4m3fn", block_size=(1, 5)
    )
    assert np.array_equal(
        np.asarray(blockwise[0]), np.asarray(jquant.fake_quantize_affine(x, 0.5, None, dtype="float8_e4m3fn"))
    )
