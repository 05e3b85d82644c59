"""Scale and zero point from observed ranges, exactly as torch's observers compute them."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jquant.numerics.exact import exact_divide
from jquant.numerics.qschemes import canonical_qscheme, is_symmetric
from jquant.numerics.qtypes import canonical_dtype, float_qtype_max, is_float_qtype, qrange

FLOAT32_EPS = float(np.finfo(np.float32).eps)


def _range_over(hi: jnp.ndarray, lo: jnp.ndarray, levels: float) -> jnp.ndarray:
    """``(hi - lo) / levels`` with torch's rounding; where ``hi - lo`` overflows float32 (a finite range such as
    +-3e38, where torch's scale becomes inf), ``hi / levels - lo / levels`` instead, which stays finite."""
    levels32 = np.float32(levels)
    plain = exact_divide(hi - lo, levels32)
    split = exact_divide(hi, levels32) - exact_divide(lo, levels32)
    return jnp.where(jnp.isfinite(hi - lo) | ~(jnp.isfinite(hi) & jnp.isfinite(lo)), plain, split)


def choose_qparams(
    min_val: Any,
    max_val: Any,
    *,
    dtype: Any = "int8",
    qscheme: str = "per_tensor_affine",
    quant_min: int | None = None,
    quant_max: int | None = None,
    reduce_range: bool = False,
    eps: float = FLOAT32_EPS,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Return ``(scale, zero_point)`` for observed ``min_val``/``max_val`` as torch's observers do.

    Works elementwise, so per-channel mins/maxes give per-channel qparams. Entries never observed
    (``min=+inf, max=-inf``) get ``(1.0, 0)``, like torch. ``zero_point`` is int32, except for
    ``per_channel_affine_float_qparams`` where it is float32 (as in torch). Float8 qtypes get a scale
    of ``absmax / finfo.max`` and a zero point of 0. A finite range whose width overflows float32 (e.g.
    +-3e38; torch's scale is inf there) gets the finite scale ``max / levels - min / levels``.
    """
    qscheme = canonical_qscheme(qscheme)
    name = canonical_dtype(dtype)
    min_val = jnp.asarray(min_val, jnp.float32)
    max_val = jnp.asarray(max_val, jnp.float32)
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val/max_val: shapes differ, {min_val.shape} vs {max_val.shape}")
    eps32 = jnp.float32(eps)
    unobserved = (min_val == jnp.inf) & (max_val == -jnp.inf)
    if is_float_qtype(name):
        amax = jnp.maximum(-jnp.minimum(min_val, 0.0), jnp.maximum(max_val, 0.0))
        scale = jnp.maximum(exact_divide(amax, float_qtype_max(name)), eps32)
        scale = jnp.where(unobserved, 1.0, scale)
        return scale, jnp.zeros(scale.shape, jnp.int32)

    custom = quant_min is not None
    if reduce_range and is_symmetric(qscheme) and name == "uint8":
        raise ValueError(f"reduce_range: not supported for {qscheme} with {name} (torch refuses it too)")
    qmin, qmax = qrange(name, quant_min, quant_max, reduce_range)
    min_neg = jnp.minimum(min_val, 0.0)
    max_pos = jnp.maximum(max_val, 0.0)
    if is_symmetric(qscheme):
        amax = jnp.maximum(-min_neg, max_pos)
        scale = jnp.maximum(exact_divide(amax, np.float32((qmax - qmin) / 2)), eps32)
        if name == "uint8":
            zp_value = (qmin + qmax) // 2 if custom else 128
        elif name == "uint16":
            zp_value = 2**15
        else:
            zp_value = 0
        zero_point = jnp.full(scale.shape, zp_value, jnp.int32)
    elif qscheme == "per_channel_affine_float_qparams":
        scale = _range_over(max_val, min_val, qmax - qmin)
        scale = jnp.where(scale > eps32, scale, 1.0)
        zero_point = exact_divide(-min_val, scale)
        zero_point = jnp.where(unobserved, 0.0, zero_point)
    else:
        scale = jnp.maximum(_range_over(max_pos, min_neg, qmax - qmin), eps32)
        zero_point = qmin - jnp.round(exact_divide(min_neg, scale)).astype(jnp.int32)
        zero_point = jnp.clip(zero_point, qmin, qmax)
    scale = jnp.where(unobserved, 1.0, scale)
    zero_point = jnp.where(unobserved, jnp.zeros_like(zero_point), zero_point)
    return scale, zero_point
