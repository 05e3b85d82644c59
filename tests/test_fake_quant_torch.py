"""Fake-quant forward and gradient against torch, bit for bit, on >= 1e5 values per case."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jquant

N = 100_000
RANGES = {"int8": (-128, 127), "uint8": (0, 255), "custom": (-20, 45), "reduced_uint8": (0, 127)}


def _values(rng, scale, zero_point, qmin, qmax, n=N):
    """Exact ties (k + 0.5) * scale, values far outside the range, and ordinary values."""
    k = rng.integers(qmin - zero_point - 5, qmax - zero_point + 5, n // 2)
    ties = ((k + 0.5) * scale).astype(np.float32)
    far = (rng.standard_normal(n // 4) * scale * (qmax - qmin) * 4).astype(np.float32)
    usual = (rng.standard_normal(n - n // 2 - n // 4) * scale * (qmax - qmin) / 4).astype(np.float32)
    return np.concatenate([ties, far, usual])


def _torch_per_tensor(x, dy, scale, zp, qmin, qmax):
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.fake_quantize_per_tensor_affine(tx, float(scale), int(zp), qmin, qmax)
    ty.backward(torch.tensor(dy))
    return ty.detach().numpy(), tx.grad.numpy()


@pytest.mark.parametrize("range_name", list(RANGES))
def test_per_tensor_forward_and_gradient_equal_torch(rng, range_name):
    qmin, qmax = RANGES[range_name]
    f = jax.jit(
        lambda x, s, z: jax.vjp(lambda v: jquant.fake_quantize_per_tensor_affine(v, s, z, qmin, qmax), x),
    )
    for _ in range(3):
        scale = np.float32(rng.uniform(1e-3, 0.5))
        zp = int(rng.integers(qmin, qmax + 1))
        x = _values(rng, scale, zp, qmin, qmax)
        dy = rng.standard_normal(x.size).astype(np.float32)
        want_y, want_dx = _torch_per_tensor(x, dy, scale, zp, qmin, qmax)
        y, vjp = f(x, scale, zp)
        (dx,) = vjp(dy)
        assert np.array_equal(np.asarray(y), want_y), f"forward mismatches: {(np.asarray(y) != want_y).sum()}"
        assert np.array_equal(np.asarray(dx), want_dx), f"gradient mismatches: {(np.asarray(dx) != want_dx).sum()}"


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("range_name", ["int8", "uint8", "custom"])
def test_per_channel_every_axis_equal_torch(rng, axis, range_name):
    qmin, qmax = RANGES[range_name]
    shape = [8, 50, 256]
    channels = shape[axis]
    scale = rng.uniform(1e-3, 0.3, channels).astype(np.float32)
    zp = rng.integers(qmin, qmax + 1, channels).astype(np.int32)
    bshape = [1, 1, 1]
    bshape[axis] = channels
    k = rng.integers(qmin - 140, qmax + 140, shape)
    x = np.where(
        rng.random(shape) < 0.5,
        (k + 0.5) * scale.reshape(bshape),
        rng.standard_normal(shape) * scale.reshape(bshape) * 200,
    ).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.fake_quantize_per_channel_affine(tx, torch.tensor(scale), torch.tensor(zp), axis % 3, qmin, qmax)
    ty.backward(torch.tensor(dy))
    f = jax.jit(lambda v: jquant.fake_quantize_per_channel_affine(v, scale, zp, axis, qmin, qmax))
    y, vjp = jax.vjp(f, x)
    (dx,) = vjp(dy)
    assert np.array_equal(np.asarray(y), ty.detach().numpy())
    assert np.array_equal(np.asarray(dx), tx.grad.numpy())


def test_per_channel_float_zero_point_equal_torch(rng):
    """per_channel_affine_float_qparams: the float zero point is added before rounding."""
    qmin, qmax = 0, 255
    x = (rng.standard_normal((16, 8000)) * 3).astype(np.float32)
    scale = rng.uniform(0.01, 0.1, 16).astype(np.float32)
    zp = rng.uniform(-10, 200, 16).astype(np.float32)
    want = torch.fake_quantize_per_channel_affine(torch.tensor(x), torch.tensor(scale), torch.tensor(zp), 0, qmin, qmax)
    got = jax.jit(lambda v: jquant.fake_quantize_per_channel_affine(v, scale, zp, 0, qmin, qmax))(x)
    assert np.array_equal(np.asarray(got), want.numpy())


def test_generic_fake_quantize_affine_matches_named_ops(rng):
    x = (rng.standard_normal((32, 64)) * 4).astype(np.float32)
    scale = rng.uniform(0.01, 0.1, 64).astype(np.float32)
    zp = rng.integers(-10, 10, 64).astype(np.int32)
    named = jquant.fake_quantize_per_channel_affine(x, scale, zp, 1, -128, 127)
    generic = jquant.fake_quantize_affine(x, scale, zp, dtype="int8", axis=1)
    blockwise = jquant.fake_quantize_affine(
        x, scale.reshape(1, 64), zp.reshape(1, 64), dtype="int8", block_size=(32, 1)
    )
    assert np.array_equal(np.asarray(named), np.asarray(generic))
    assert np.array_equal(np.asarray(named), np.asarray(blockwise))


def test_gradient_is_zero_outside_and_identity_inside():
    x = jnp.array([-200.0, -1.0, 0.0, 1.0, 200.0], jnp.float32)
    g = jax.grad(lambda v: jquant.fake_quantize_per_tensor_affine(v, 0.1, 0, -128, 127).sum())(x)
    assert np.array_equal(np.asarray(g), [0.0, 1.0, 1.0, 1.0, 0.0])


def test_vmap_over_batch_of_scales(rng):
    x = rng.standard_normal((4, 100)).astype(np.float32)
    scales = np.array([0.01, 0.02, 0.05, 0.1], np.float32)
    batched = jax.vmap(lambda v, s: jquant.fake_quantize_per_tensor_affine(v, s, 0, -128, 127))(x, scales)
    for i in range(4):
        want = torch.fake_quantize_per_tensor_affine(torch.tensor(x[i]), float(scales[i]), 0, -128, 127)
        assert np.array_equal(np.asarray(batched[i]), want.numpy())
