"""Learnable (LSQ) fake quant: forward and the gradients of x, scale and zero point against torch."""

import jax
import numpy as np
import pytest
import torch

import jquant


def _sum_close(got, want, terms_abs_sum):
    """Sums of per-element gradients agree to float32 rounding of the sum (relative to the sum of |terms|)."""
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6 * terms_abs_sum + 1e-6)


@pytest.mark.parametrize("qrange", [(-128, 127), (0, 255), (-8, 7)])
@pytest.mark.parametrize("grad_factor", [1.0, 0.37])
def test_learnable_per_tensor_equals_torch(rng, qrange, grad_factor):
    qmin, qmax = qrange
    for _ in range(2):
        scale = np.float32(rng.uniform(0.005, 0.2))
        zp = np.float32(rng.uniform(qmin, qmax))
        k = rng.integers(qmin - 30, qmax + 30, 50_000)
        x = np.concatenate(
            [((k - round(zp) + 0.5) * scale), rng.standard_normal(50_000) * scale * (qmax - qmin) / 2]
        ).astype(np.float32)
        dy = rng.standard_normal(x.size).astype(np.float32)
        tx, ts, tz = (torch.tensor(v, requires_grad=True) for v in (x, [scale], [zp]))
        ty = torch._fake_quantize_learnable_per_tensor_affine(tx, ts, tz, qmin, qmax, grad_factor)
        ty.backward(torch.tensor(dy))
        fn = jax.jit(lambda v, s, z: jquant.fake_quantize_learnable_per_tensor_affine(v, s, z, qmin, qmax, grad_factor))
        y, vjp = jax.vjp(fn, x, np.array([scale]), np.array([zp], np.float32))
        dx, ds, dz = vjp(dy)
        assert np.array_equal(np.asarray(y), ty.detach().numpy())
        assert np.array_equal(np.asarray(dx), tx.grad.numpy())
        scale_terms = np.abs(dy).sum() * (qmax - qmin)
        _sum_close(ds, ts.grad.numpy(), scale_terms)
        _sum_close(dz, tz.grad.numpy(), np.abs(dy).sum() * scale)


@pytest.mark.parametrize("axis", [0, 1])
def test_learnable_per_channel_equals_torch(rng, axis):
    qmin, qmax = -128, 127
    shape = (12, 4000) if axis == 0 else (4000, 12)
    channels = shape[axis]
    scale = rng.uniform(0.01, 0.1, channels).astype(np.float32)
    zp = rng.uniform(-20, 20, channels).astype(np.float32)
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    tx, ts, tz = (torch.tensor(v, requires_grad=True) for v in (x, scale, zp))
    ty = torch._fake_quantize_learnable_per_channel_affine(tx, ts, tz, axis, qmin, qmax, 1.0)
    ty.backward(torch.tensor(dy))
    fn = lambda v, s, z: jquant.fake_quantize_learnable_per_channel_affine(v, s, z, axis, qmin, qmax)
    y, vjp = jax.vjp(jax.jit(fn), x, scale, zp)
    dx, ds, dz = vjp(dy)
    assert np.array_equal(np.asarray(y), ty.detach().numpy())
    assert np.array_equal(np.asarray(dx), tx.grad.numpy())
    other = 1 - axis
    _sum_close(ds, ts.grad.numpy(), np.abs(dy).sum(axis=other).max() * (qmax - qmin))
    _sum_close(dz, tz.grad.numpy(), np.abs(dy).sum(axis=other).max() * scale.max())
    # per element (no summation noise) the scale gradient is close to torch's double-precision result
    np.testing.assert_allclose(np.asarray(ds), ts.grad.numpy(), rtol=2e-5, atol=1e-4)
