"""Two 4-bit values per byte: element ``2i`` in the low nibble, ``2i+1`` in the high nibble (torchao's order)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jquant.numerics.granularity import normalize_axis


def _check_nibbles(q: jnp.ndarray) -> None:
    """Concrete values must fit in 4 bits (a traced ``q`` cannot be checked; out-of-range values would wrap)."""
    if isinstance(q, jax.core.Tracer):
        return
    values = np.asarray(q)
    lo, hi = (-8, 7) if values.dtype == np.int8 else (0, 15)
    outside = (values < lo) | (values > hi)
    if np.any(outside):
        kind = "int4" if values.dtype == np.int8 else "uint4"
        raise ValueError(
            f"q: pack_int4 got {values[outside].flat[0]}, outside the {kind} range [{lo}, {hi}]; it would wrap "
            f"to another value. Quantize with dtype='{kind}' (or clip) before packing"
        )


def pack_int4(q: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
    """Pack int4 (int8 storage, -8..7) or uint4 (uint8 storage, 0..15) values pairwise along ``axis`` into uint8.

    Concrete values outside the 4-bit range raise ValueError; under ``jit`` (traced ``q``) they are not
    checked and keep only their low nibble."""
    q = jnp.asarray(q)
    axis = normalize_axis(axis, q.ndim)
    if q.shape[axis] % 2:
        raise ValueError(f"q: pack_int4 needs an even size along axis {axis}, got shape {q.shape}")
    if q.dtype not in (jnp.int8, jnp.uint8):
        raise TypeError(f"q: expected int8 (int4 values) or uint8 (uint4 values), got {q.dtype}")
    _check_nibbles(q)
    nibbles = q.astype(jnp.uint8) & 0x0F
    moved = jnp.moveaxis(nibbles, axis, -1)
    low, high = moved[..., 0::2], moved[..., 1::2]
    return jnp.moveaxis(low | (high << 4), -1, axis)


def unpack_int4(packed: jnp.ndarray, axis: int = -1, signed: bool = True) -> jnp.ndarray:
    """Inverse of ``pack_int4``: int8 values in -8..7 (``signed``) or uint8 values in 0..15."""
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed: expected uint8, got {packed.dtype}")
    axis = normalize_axis(axis, packed.ndim)
    moved = jnp.moveaxis(packed, axis, -1)
    low, high = moved & 0x0F, moved >> 4
    both = jnp.stack([low, high], axis=-1).reshape(*moved.shape[:-1], moved.shape[-1] * 2)
    if signed:
        both = (both.astype(jnp.int8) ^ 8) - 8  # sign-extend the nibble
    return jnp.moveaxis(both, -1, axis)
