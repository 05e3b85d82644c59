"""Run-time activation quantization for the integer kernels.

Activations are always fed to the integer dot as int8: uint8 values are shifted by -128 together with their
zero point (``(q - zp) == (q - 128) - (zp - 128)``), so one int8 x int8 -> int32 kernel serves both, and
XLA:CPU's fast int8 path (which takes s8 x s8, not u8 x s8) is used. Rounding follows
``jquant.numerics.affine``: multiply by the float32 reciprocal of the scale, round half to even, add the zero
point, clamp; so the integer values are exactly the fake-quant grid values.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jquant.numerics.affine import reciprocal, round_to_grid
from jquant.numerics.qparams import choose_qparams
from jquant.numerics.qtypes import canonical_dtype, qrange

ACT_DTYPES = ("int8", "uint8")


def act_range(dtype: Any, quant_min: int | None = None, quant_max: int | None = None) -> tuple[int, int, int]:
    """``(qmin, qmax, shift)``: the activation range and the shift that maps it into int8."""
    name = canonical_dtype(dtype)
    if name not in ACT_DTYPES:
        raise ValueError(f"act_dtype: integer kernels take activations of {ACT_DTYPES}, got {dtype!r}")
    qmin, qmax = qrange(name, quant_min, quant_max)
    shift = 128 if name == "uint8" else 0
    return qmin, qmax, shift


def quantize_activation(
    x: jnp.ndarray,
    scale: Any,
    zero_point: Any = 0,
    *,
    dtype: Any = "uint8",
    quant_min: int | None = None,
    quant_max: int | None = None,
    inv_scale: Any = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Quantize ``x`` with ``scale``/``zero_point`` (broadcast against ``x``) into int8 storage.

    ``inv_scale``: the precomputed float32 ``1 / scale`` (saves a division per call for static qparams).

    Returns ``(q, zp)`` with ``q`` int8 and ``zp`` int32 such that ``(q - zp) * scale`` is the fake-quant
    value of ``x``; for uint8 both are shifted by -128. Integer ``x`` is taken as already quantized
    (values in ``dtype``'s range) and only shifted.
    """
    qmin, qmax, shift = act_range(dtype, quant_min, quant_max)
    zp = jnp.asarray(zero_point, jnp.int32)
    if jnp.issubdtype(x.dtype, jnp.integer):
        q = x.astype(jnp.int32)
    else:
        inv = reciprocal(jnp.asarray(scale, jnp.float32)) if inv_scale is None else jnp.asarray(inv_scale, jnp.float32)
        q = jnp.clip(round_to_grid(x.astype(jnp.float32), inv, zp), qmin, qmax)
    return (q - shift).astype(jnp.int8), zp - shift


def dynamic_qparams(
    x: jnp.ndarray, reduce_axes: tuple[int, ...], *, symmetric: bool = True, dtype: Any = "int8"
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Scale and zero point of ``x`` over ``reduce_axes`` (kept as size-1 dims), computed at run time."""
    # NaN / inf entries are skipped, as the observers skip them: one bad value does not poison the other rows.
    finite = jnp.isfinite(x)
    mn = jnp.min(x, axis=reduce_axes, keepdims=True, initial=jnp.inf, where=finite)
    mx = jnp.max(x, axis=reduce_axes, keepdims=True, initial=-jnp.inf, where=finite)
    mn, mx = jnp.minimum(mn, 0.0), jnp.maximum(mx, 0.0)  # all entries non-finite: the range [0, 0]
    qscheme = "per_tensor_symmetric" if symmetric else "per_tensor_affine"
    return choose_qparams(mn, mx, dtype=dtype, qscheme=qscheme)
