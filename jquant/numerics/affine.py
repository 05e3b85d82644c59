"""Quantize, dequantize and straight-through fake-quantize at any granularity.

Rounding convention (torch's fake-quant kernels and torchao's ``quantize_affine``): multiply by the float32
reciprocal of the scale, round half to even, then add an integer zero point; a float zero point (the
``per_channel_affine_float_qparams`` scheme) is added before rounding. Consequently
``dequantize_affine(quantize_affine(x))`` equals the fake-quant output bit for bit. With ``zero_point == 0``
this is also bit-exact with ``torch.quantize_per_tensor`` / ``torch.quantize_per_channel``; with a nonzero
integer zero point those torch ops may differ at exact ties (they round ``x*inv + zp`` in one step).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.numerics.exact import exact_divide, product_of_difference, unfused_multiply
from jquant.numerics.granularity import apply_blockwise, block_size_for
from jquant.numerics.qtypes import canonical_dtype, float_qtype_max, is_float_qtype, qrange, storage_dtype

SMALLEST_NORMAL_SCALE = float(np.finfo(np.float32).tiny)


def _concrete(value: Any) -> np.ndarray | None:
    """``value`` as a numpy array, or None when it is traced (only concrete values can be checked)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return np.asarray(value)
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_scale(scale: Any) -> None:
    """Concrete scales must be finite normal float32 numbers > 0.

    A subnormal scale (below ``float32`` tiny, 1.18e-38) passes ``> 0`` but XLA flushes subnormals to zero,
    so ``1 / scale`` becomes inf and the output NaN. Traced scales cannot be checked here: under ``jit`` a bad
    scale gives NaN/inf outputs instead of an error.
    """
    values = _concrete(scale)
    if values is None:
        return
    if values.size == 0:
        raise ValueError("scale: empty array")
    values = values.astype(np.float32) if values.dtype.kind in "iub" else values
    bad = ~(np.isfinite(values) & (values >= SMALLEST_NORMAL_SCALE))
    if np.any(bad):
        culprit = float(values[bad].flat[0])
        if np.isfinite(culprit) and culprit > 0:
            raise ValueError(
                f"scale: {culprit!r} is subnormal in float32 (below {SMALLEST_NORMAL_SCALE:.6g}); XLA flushes "
                "subnormals to zero, so it would give inf/NaN. Use a larger scale (observers clamp it to eps)"
            )
        raise ValueError(f"scale: every scale must be > 0 and finite, got {culprit!r}")


def _check_zero_point(zero_point: Any, quant_min: int, quant_max: int) -> None:
    """Concrete integer zero points must lie in ``[quant_min, quant_max]`` (torch raises too).

    Float zero points (``per_channel_affine_float_qparams``) are not range-checked, as in torch. Traced zero
    points cannot be checked: under ``jit`` an out-of-range one gives a clamped (constant) output.
    """
    values = _concrete(zero_point)
    if values is None or values.dtype.kind == "f":
        return
    outside = (values < quant_min) | (values > quant_max)
    if np.any(outside):
        raise ValueError(
            f"zero_point: {values[outside].flat[0]} lies outside [quant_min, quant_max] = [{quant_min}, "
            f"{quant_max}]; every zero point must be in that range"
        )


def _check_input(x: jnp.ndarray) -> None:
    if x.size == 0:
        raise ValueError(f"x: empty array of shape {x.shape}; nothing to quantize")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a floating-point array, got dtype {x.dtype}")


def _is_float_zp(zero_point: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(zero_point), jnp.floating)


def round_to_grid(x: jnp.ndarray, inv_scale: jnp.ndarray, zero_point: jnp.ndarray) -> jnp.ndarray:
    """Unclamped integer grid value of ``x`` (float32), as torch's fake-quant kernels compute it."""
    if _is_float_zp(zero_point):
        # XLA:CPU would contract x*inv + zp into an FMA; torch's per-channel float-qparams kernel is not fused.
        return jnp.round(unfused_multiply(x, inv_scale) + zero_point)
    return jnp.round(x * inv_scale) + zero_point.astype(x.dtype)


def reciprocal(scale: jnp.ndarray) -> jnp.ndarray:
    """float32 ``1 / scale`` with IEEE division (torch multiplies by this, never divides)."""
    scale = jnp.asarray(scale, jnp.float32)
    return exact_divide(jnp.ones_like(scale), scale)


def _fake_quant_values(x, scale, zero_point, qmin, qmax):
    # Low-precision inputs (bf16, f16) are computed in float32 with the float32 scale and rounded once to the
    # input dtype at the end, as torch does; casting the scale to bf16 first would move ~60% of the outputs.
    out_dtype = x.dtype
    compute = jnp.promote_types(out_dtype, jnp.float32)
    x = x.astype(compute)
    scale = scale.astype(compute)
    q = round_to_grid(x, reciprocal(scale).astype(compute), zero_point)
    zp = zero_point.astype(compute)
    if _is_float_zp(zero_point):
        # torch computes (q - zp) * scale in double here (q is an int64), then rounds once.
        y = product_of_difference(jnp.clip(q, qmin, qmax), zp, scale)
    else:
        y = (jnp.clip(q, qmin, qmax) - zp) * scale
    return y.astype(out_dtype), (q >= qmin) & (q <= qmax)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fake_quant_ste(x, scale, zero_point, qmin, qmax, block):
    return apply_blockwise(lambda *a: _fake_quant_values(*a, qmin, qmax)[0], x, block, scale, zero_point)


def _fake_quant_ste_fwd(x, scale, zero_point, qmin, qmax, block):
    y, mask = apply_blockwise(lambda *a: _fake_quant_values(*a, qmin, qmax), x, block, scale, zero_point)
    return y, (mask, scale, zero_point)


def _fake_quant_ste_bwd(qmin, qmax, block, residuals, dy):
    mask, scale, zero_point = residuals
    return jnp.where(mask, dy, jnp.zeros_like(dy)), jnp.zeros_like(scale), _zero_cotangent(zero_point)


def _zero_cotangent(value: jnp.ndarray) -> Any:
    if jnp.issubdtype(value.dtype, jnp.floating):
        return jnp.zeros_like(value)
    return np.zeros(value.shape, dtype=jax.dtypes.float0)


_fake_quant_ste.defvjp(_fake_quant_ste_fwd, _fake_quant_ste_bwd)


def fake_quantize_affine(
    x: jnp.ndarray,
    scale: Any,
    zero_point: Any,
    *,
    dtype: Any = "int8",
    axis: int | None = None,
    block_size: Sequence[int] | None = None,
    quant_min: int | None = None,
    quant_max: int | None = None,
) -> jnp.ndarray:
    """Quantize then dequantize ``x``; the gradient is straight-through inside the range, 0 outside.

    ``axis`` gives per-channel qparams, ``block_size`` per-block ones (see ``granularity``). Float8 qtypes
    round through the float8 dtype (scale only).
    """
    x = jnp.asarray(x)
    _check_input(x)
    _check_scale(scale)
    block = block_size_for(x.shape, axis, block_size)
    scale = jnp.asarray(scale, jnp.float32)
    if is_float_qtype(dtype):
        return _fake_quant_float8(x, scale, canonical_dtype(dtype), block)
    qmin, qmax = qrange(dtype, quant_min, quant_max)
    _check_zero_point(zero_point, qmin, qmax)
    zero_point = jnp.asarray(zero_point)
    if not _is_float_zp(zero_point):
        zero_point = zero_point.astype(jnp.int32)
    return _fake_quant_ste(x, scale, zero_point, qmin, qmax, block)


def quantize_affine(
    x: jnp.ndarray,
    scale: Any,
    zero_point: Any,
    *,
    dtype: Any,
    axis: int | None = None,
    block_size: Sequence[int] | None = None,
    quant_min: int | None = None,
    quant_max: int | None = None,
) -> jnp.ndarray:
    """Quantize ``x`` to an integer (or float8) array of ``dtype``'s storage type.

    int4/uint4 values are returned one per int8/uint8 byte; pack them with ``pack_int4``.
    """
    x = jnp.asarray(x)
    _check_input(x)
    _check_scale(scale)
    block = block_size_for(x.shape, axis, block_size)
    scale = jnp.asarray(scale, jnp.float32)
    name = canonical_dtype(dtype)
    if is_float_qtype(name):
        fmax = float_qtype_max(name)
        return apply_blockwise(
            lambda v, s: jnp.clip(exact_divide(v.astype(jnp.float32), s), -fmax, fmax).astype(storage_dtype(name)),
            x,
            block,
            scale,
        )
    qmin, qmax = qrange(name, quant_min, quant_max)
    _check_zero_point(zero_point, qmin, qmax)
    zero_point = jnp.asarray(zero_point)

    def quantize(v, s, zp):
        q = round_to_grid(v.astype(jnp.float32), reciprocal(s), zp)
        return jnp.clip(q, qmin, qmax).astype(storage_dtype(name))

    return apply_blockwise(quantize, x, block, scale, zero_point)


def dequantize_affine(
    q: jnp.ndarray,
    scale: Any,
    zero_point: Any,
    *,
    axis: int | None = None,
    block_size: Sequence[int] | None = None,
    dtype: Any = jnp.float32,
) -> jnp.ndarray:
    """``(q - zero_point) * scale`` in float32, cast to ``dtype``. ``zero_point=None`` means 0."""
    q = jnp.asarray(q)
    _check_scale(scale)
    block = block_size_for(q.shape, axis, block_size)
    scale = jnp.asarray(scale, jnp.float32)
    if zero_point is None:
        zero_point = jnp.zeros(scale.shape, jnp.int32)
    zero_point = jnp.asarray(zero_point)
    return apply_blockwise(
        lambda v, s, zp: ((v.astype(jnp.float32) - zp.astype(jnp.float32)) * s).astype(dtype),
        q,
        block,
        scale,
        zero_point,
    )


def _float8_values(x, scale, name):
    """Round ``x / scale`` through the float8 dtype; also the in-range mask for the gradient."""
    fmax = float_qtype_max(name)
    scaled = exact_divide(x.astype(jnp.float32), scale)
    rounded = jnp.clip(scaled, -fmax, fmax).astype(storage_dtype(name)).astype(jnp.float32)
    return (rounded * scale).astype(x.dtype), jnp.abs(scaled) <= fmax


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fake_quant_float8(x, scale, name, block):
    return apply_blockwise(lambda a, b: _float8_values(a, b, name)[0], x, block, scale)


def _fake_quant_float8_fwd(x, scale, name, block):
    y, mask = apply_blockwise(lambda a, b: _float8_values(a, b, name), x, block, scale)
    return y, (mask, scale)


def _fake_quant_float8_bwd(name, block, residuals, dy):
    mask, scale = residuals
    return jnp.where(mask, dy, jnp.zeros_like(dy)), jnp.zeros_like(scale)


_fake_quant_float8.defvjp(_fake_quant_float8_fwd, _fake_quant_float8_bwd)
