"""Average pooling on quantized integers, rounded as torch's quantized ``avg_pool2d`` and ``mean`` round.

torch's quantized average pool and mean keep the input's qparams and compute, per output element,
``clamp(nearbyint(float(sum(q - zp)) * float(1 / divisor) + zp))`` in float32 with two roundings (the product, then
the add; measured bit-exact against torch 2.13 for NCHW ``avg_pool2d`` with and without padding /
``count_include_pad`` and for ``torch.mean``). ``adaptive_avg_pool2d`` rounds ``sum(q) * (1 / n)`` instead, which
differs at exact ties only. The product goes through ``opaque`` so that XLA's FMA contraction, which would round
once, does not move ties (0.01% of all sums for a divisor of 6).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.numerics.exact import exact_divide, opaque


def average_sum(q: jnp.ndarray, zero_point: jnp.ndarray, primitive: str, params: dict) -> jnp.ndarray:
    """``sum(q - zero_point)`` in int32 over the windows of a ``reduce_window_sum`` or the axes of a ``reduce_sum``
    (``params``: that equation's parameters; padding adds zeros, i.e. values equal to the zero point)."""
    centered = q.astype(jnp.int32) - jnp.asarray(zero_point, jnp.int32)
    if primitive == "reduce_sum":
        return jnp.sum(centered, axis=tuple(params["axes"]), dtype=jnp.int32)
    if primitive == "reduce_window_sum":
        return lax.reduce_window(
            centered, np.int32(0), lax.add, tuple(params["window_dimensions"]), tuple(params["window_strides"]),
            tuple(map(tuple, params["padding"])), base_dilation=tuple(params["base_dilation"]),
            window_dilation=tuple(params["window_dilation"]),
        )
    raise ValueError(f"average_sum: expected a reduce_sum or reduce_window_sum equation, got {primitive!r}")


def requantize_average(
    total: jnp.ndarray, divisor: jnp.ndarray | float, zero_point: jnp.ndarray, dtype: str
) -> jnp.ndarray:
    """``total / divisor`` back on the input's grid (same scale and zero point), clamped to ``dtype``'s range.

    ``total``: int32 sums of ``q - zero_point``; ``divisor``: the element count (a scalar or an array
    broadcasting to ``total``, e.g. the per-position counts of ``count_include_pad=False``)."""
    info = jnp.iinfo(dtype)
    multiplier = exact_divide(jnp.float32(1.0), jnp.asarray(divisor, jnp.float32))
    product = opaque(total.astype(jnp.float32) * multiplier)
    value = jnp.round(product + jnp.asarray(zero_point, jnp.float32))
    return jnp.clip(value, info.min, info.max).astype(dtype)


def quantized_average(
    q: jnp.ndarray, zero_point: jnp.ndarray, divisor: jnp.ndarray | float, primitive: str, params: dict,
    dtype: str | None = None, shape: tuple[int, ...] | None = None,
) -> jnp.ndarray:
    """An average pool / mean of quantized ``q`` with its own qparams kept (torch's quantized avg_pool2d, mean);
    ``shape``: the sums reshaped first (a mean with ``keepdims``)."""
    total = average_sum(q, zero_point, primitive, params)
    if shape is not None:
        total = total.reshape(shape)
    return requantize_average(total, divisor, zero_point, dtype or str(q.dtype))

