"""PyTorch-named fake-quant ops with torch's argument order, forward values and gradients.

``fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine`` match
``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine`` bit for bit, including
the straight-through gradient (``dy`` where ``quant_min <= round(x/scale) + zp <= quant_max``, inclusive, 0
elsewhere; no gradient to scale or zero point). bf16 / f16 inputs are computed in float32 and rounded once to
the input dtype, as torch does.

Checked when concrete (torch raises too): the scale is a finite normal float32 > 0 and an integer zero point
lies in ``[quant_min, quant_max]``. Under ``jit`` traced qparams cannot be checked: an out-of-range zero point
then gives a clamped, constant output and a zero / subnormal scale gives inf or NaN.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jquant.numerics.affine import _check_input, _check_scale, _check_zero_point, _fake_quant_ste, _is_float_zp
from jquant.numerics.granularity import block_size_for, normalize_axis


def check_quant_range(quant_min: int, quant_max: int) -> tuple[int, int]:
    quant_min, quant_max = int(quant_min), int(quant_max)
    if not quant_min < quant_max:
        raise ValueError(f"quant_min/quant_max: need quant_min < quant_max, got ({quant_min}, {quant_max})")
    return quant_min, quant_max


def _zero_point_array(zero_point: Any) -> jnp.ndarray:
    zero_point = jnp.asarray(zero_point)
    return zero_point if _is_float_zp(zero_point) else zero_point.astype(jnp.int32)


def fake_quantize_per_tensor_affine(
    x: jnp.ndarray, scale: Any, zero_point: Any, quant_min: int, quant_max: int
) -> jnp.ndarray:
    """``torch.fake_quantize_per_tensor_affine``: one scale and one integer zero point for the whole tensor."""
    x = jnp.asarray(x)
    _check_input(x)
    _check_scale(scale)
    quant_min, quant_max = check_quant_range(quant_min, quant_max)
    _check_zero_point(zero_point, quant_min, quant_max)
    scale = jnp.asarray(scale, jnp.float32)
    if scale.size != 1:
        raise ValueError(f"scale: per-tensor fake quant needs one scale, got shape {scale.shape}")
    zero_point = _zero_point_array(zero_point)
    if zero_point.size != 1:
        raise ValueError(f"zero_point: per-tensor fake quant needs one zero point, got shape {zero_point.shape}")
    return _fake_quant_ste(x, scale, zero_point.astype(jnp.int32), quant_min, quant_max, tuple(x.shape))


def fake_quantize_per_channel_affine(
    x: jnp.ndarray, scale: Any, zero_point: Any, axis: int, quant_min: int, quant_max: int
) -> jnp.ndarray:
    """``torch.fake_quantize_per_channel_affine``: qparams of shape ``(x.shape[axis],)``.

    An integer zero point is added after rounding; a float one (``per_channel_affine_float_qparams``) before.
    """
    x = jnp.asarray(x)
    _check_input(x)
    _check_scale(scale)
    quant_min, quant_max = check_quant_range(quant_min, quant_max)
    _check_zero_point(zero_point, quant_min, quant_max)
    axis = normalize_axis(axis, x.ndim)
    channels = x.shape[axis]
    scale = jnp.asarray(scale, jnp.float32)
    zero_point = _zero_point_array(zero_point)
    for name, value in (("scale", scale), ("zero_point", zero_point)):
        if value.shape != (channels,):
            raise ValueError(
                f"{name}: per-channel fake quant on axis {axis} of shape {x.shape} needs shape ({channels},), "
                f"got {value.shape}"
            )
    return _fake_quant_ste(x, scale, zero_point, quant_min, quant_max, block_size_for(x.shape, axis, None))
