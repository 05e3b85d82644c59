"""Learnable fake quantization (LSQ), as ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``.

Forward: the zero point is rounded half-to-even and clamped to the range, then plain fake quant. Backward
(torch's formulas; ``g`` is ``grad_factor``, ``zq`` the zero point torch uses in its backward, ``xq`` the
unclamped grid value ``round(zq + x * inv_scale)``)::

    quant_min <= xq <= quant_max:  dx = dy;  dscale = dy * (y - x) * inv_scale * g;  dzp = 0
    xq < quant_min:                dx = 0;   dscale = dy * (quant_min - zq) * g;      dzp = -dy * scale * g
    xq > quant_max:                dx = 0;   dscale = dy * (quant_max - zq) * g;      dzp = -dy * scale * g

The output and ``dx`` have the input's dtype (bf16 / f16 inputs are computed in float32 and rounded once);
``dscale``/``dzp`` are float32, summed over the tensor (per channel for the per-channel op). torch's per-tensor
backward uses ``zq = trunc(clamp(zp + 0.5))``, its per-channel backward ``zq = clamp(round(zp))``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jquant.numerics.affine import _check_input, reciprocal
from jquant.numerics.exact import fused_multiply_add, two_product, two_sum
from jquant.numerics.fake_quant import check_quant_range
from jquant.numerics.granularity import normalize_axis


def _lsq_forward(x, scale, zp_int, qmin, qmax):
    # bf16 / f16 inputs: computed in float32, rounded once to the input dtype (as torch)
    out_dtype = x.dtype
    x = x.astype(jnp.promote_types(out_dtype, jnp.float32))
    inv = reciprocal(scale)
    q = jnp.round(x * inv) + zp_int
    return ((jnp.clip(q, qmin, qmax) - zp_int) * scale).astype(out_dtype)


def _lsq_backward(x, scale, zq, qmin, qmax, g, dy, reduce_axes):
    x_dtype = x.dtype
    x = x.astype(jnp.promote_types(x_dtype, jnp.float32))
    dy = dy.astype(x.dtype)
    inv = reciprocal(scale)
    xq = jnp.round(fused_multiply_add(x, inv, zq))  # torch's kernel compiles zq + x * inv to an FMA
    inside = (xq >= qmin) & (xq <= qmax)
    dx = jnp.where(inside, dy, 0.0)
    # torch forms (y - x) * inv_scale in double; y - x cancels badly in float32, so evaluate it exactly.
    residual = _residual_in_steps(jnp.clip(xq, qmin, qmax) - zq, scale, x, inv)
    dscale_in = dy * residual * g
    dscale_out = jnp.where(xq < qmin, dy * (qmin - zq), dy * (qmax - zq)) * g
    dscale = jnp.where(inside, dscale_in, dscale_out)
    dzp = jnp.where(inside, 0.0, -dy * scale * g)
    return dx.astype(x_dtype), jnp.sum(dscale, axis=reduce_axes), jnp.sum(dzp, axis=reduce_axes)


def _residual_in_steps(steps, scale, x, inv):
    """``(steps * scale - x) * inv`` with one float32 rounding error at most per operation."""
    p, e = two_product(steps, scale)
    d_hi, d_lo = two_sum(p, -x)
    return (d_hi + (d_lo + e)) * inv


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lsq_per_tensor(x, scale, zero_point, qmin, qmax, grad_factor):
    zp = jnp.clip(jnp.round(zero_point), qmin, qmax)
    return _lsq_forward(x, scale, zp, qmin, qmax)


def _lsq_per_tensor_fwd(x, scale, zero_point, qmin, qmax, grad_factor):
    return _lsq_per_tensor(x, scale, zero_point, qmin, qmax, grad_factor), (x, scale, zero_point)


def _lsq_per_tensor_bwd(qmin, qmax, grad_factor, residuals, dy):
    x, scale, zero_point = residuals
    zq = jnp.trunc(jnp.clip(zero_point + 0.5, qmin, qmax))
    dx, dscale, dzp = _lsq_backward(x, scale, zq, qmin, qmax, grad_factor, dy, None)
    return dx, jnp.reshape(dscale, scale.shape), jnp.reshape(dzp, zero_point.shape)


_lsq_per_tensor.defvjp(_lsq_per_tensor_fwd, _lsq_per_tensor_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _lsq_per_channel(x, scale, zero_point, axis, qmin, qmax, grad_factor):
    zp = jnp.clip(jnp.round(zero_point), qmin, qmax)
    return _lsq_forward(x, _expand(scale, x.ndim, axis), _expand(zp, x.ndim, axis), qmin, qmax)


def _lsq_per_channel_fwd(x, scale, zero_point, axis, qmin, qmax, grad_factor):
    return _lsq_per_channel(x, scale, zero_point, axis, qmin, qmax, grad_factor), (x, scale, zero_point)


def _lsq_per_channel_bwd(axis, qmin, qmax, grad_factor, residuals, dy):
    x, scale, zero_point = residuals
    zq = jnp.clip(jnp.round(zero_point), qmin, qmax)
    reduce_axes = tuple(d for d in range(x.ndim) if d != axis)
    return _lsq_backward(
        x, _expand(scale, x.ndim, axis), _expand(zq, x.ndim, axis), qmin, qmax, grad_factor, dy, reduce_axes
    )


_lsq_per_channel.defvjp(_lsq_per_channel_fwd, _lsq_per_channel_bwd)


def _expand(values: jnp.ndarray, ndim: int, axis: int) -> jnp.ndarray:
    return values.reshape(tuple(-1 if d == axis else 1 for d in range(ndim)))


def _float_qparam(name: str, value: Any, shape: tuple[int, ...] | None) -> jnp.ndarray:
    """A float32 qparam: one value when ``shape`` is None, else exactly ``shape``."""
    value = jnp.asarray(value, jnp.float32)
    if (shape is None and value.size != 1) or (shape is not None and value.shape != shape):
        raise ValueError(f"{name}: expected shape {shape if shape is not None else '() or (1,)'}, got {value.shape}")
    return value


def fake_quantize_learnable_per_tensor_affine(
    x: jnp.ndarray, scale: Any, zero_point: Any, quant_min: int, quant_max: int, grad_factor: float = 1.0
) -> jnp.ndarray:
    """LSQ fake quant with one learnable scale and zero point (float arrays); gradients for all three."""
    x = jnp.asarray(x)
    _check_input(x)
    quant_min, quant_max = check_quant_range(quant_min, quant_max)
    scale = _float_qparam("scale", scale, None)
    zero_point = _float_qparam("zero_point", zero_point, None)
    return _lsq_per_tensor(x, scale, zero_point, quant_min, quant_max, float(grad_factor))


def fake_quantize_learnable_per_channel_affine(
    x: jnp.ndarray,
    scale: Any,
    zero_point: Any,
    axis: int,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> jnp.ndarray:
    """LSQ fake quant with learnable per-channel scale and zero point of shape ``(x.shape[axis],)``."""
    x = jnp.asarray(x)
    _check_input(x)
    quant_min, quant_max = check_quant_range(quant_min, quant_max)
    axis = normalize_axis(axis, x.ndim)
    shape = (x.shape[axis],)
    scale = _float_qparam("scale", scale, shape)
    zero_point = _float_qparam("zero_point", zero_point, shape)
    return _lsq_per_channel(x, scale, zero_point, axis, quant_min, quant_max, float(grad_factor))
