"""Weight layouts the native CPU kernels read, built with plain ``jnp`` ops (once at convert time, or per call
under ``jit`` for weights that change every step).

Glossary: ``K`` the contracted length, ``N`` the output columns, a *block* 16 output columns (one 512-bit vector of
int32 / f32 lanes, two 256-bit ones).

- ``"s8_k4"`` (int8): shape ``(ceil(N/16), ceil(K/4), 16, 4)`` int8; element ``[b, q, c, j]`` is ``w[4q + j, 16b + c]``,
  so one 64-byte load holds 4 consecutive k for 16 columns, the operand order of ``vpdpbusd`` (zero padded).
- ``"s4_k8"`` (int4): shape ``(ceil(N/16), ceil(K/8), 16)`` uint32; dword ``[b, q, c]`` holds ``w[8q + j, 16b + c]``
  as a 4-bit two's complement nibble in bits ``4j..4j+3`` (zero padded).
"""

from __future__ import annotations

import jax.numpy as jnp

LAYOUTS = {"int8": "s8_k4", "int4": "s4_k8"}


def _padded(q: jnp.ndarray, k_mult: int) -> jnp.ndarray:
    k, n = q.shape
    return jnp.pad(q, ((0, -k % k_mult), (0, -n % 16)))


def pack_s8_k4(q: jnp.ndarray) -> jnp.ndarray:
    """``(K, N)`` int8 -> the ``"s8_k4"`` layout."""
    if q.ndim != 2:
        raise ValueError(f"q: expected a (K, N) matrix, got shape {q.shape}")
    p = _padded(q.astype(jnp.int8), 4)
    kp, np_ = p.shape
    return jnp.transpose(p.reshape(kp // 4, 4, np_ // 16, 16), (2, 0, 3, 1))


def pack_s4_k8(q: jnp.ndarray) -> jnp.ndarray:
    """``(K, N)`` int8 values in ``-8..7`` -> the ``"s4_k8"`` layout."""
    if q.ndim != 2:
        raise ValueError(f"q: expected a (K, N) matrix, got shape {q.shape}")
    p = _padded(q.astype(jnp.int8), 8)
    kp, np_ = p.shape
    nib = (p.astype(jnp.int32) & 0xF).astype(jnp.uint32).reshape(kp // 8, 8, np_ // 16, 16)
    shifts = (4 * jnp.arange(8, dtype=jnp.uint32)).reshape(1, 8, 1, 1)
    words = jnp.sum(nib << shifts, axis=1, dtype=jnp.uint32)  # disjoint bits: the sum is an OR
    return jnp.transpose(words, (1, 0, 2))


def pack(q: jnp.ndarray, dtype: str) -> jnp.ndarray:
    """Pack a ``(K, N)`` int8 matrix of ``dtype`` ("int8" or "int4" values) into its native layout."""
    return pack_s8_k4(q) if dtype == "int8" else pack_s4_k8(q)


def unpack(packed: jnp.ndarray, layout: str, k: int, n: int) -> jnp.ndarray:
    """Inverse of ``pack``: the ``(K, N)`` int8 matrix (used by tests and the XLA fallback)."""
    if layout == "s8_k4":
        nb, k4, _, _ = packed.shape
        return jnp.transpose(packed, (1, 3, 0, 2)).reshape(k4 * 4, nb * 16)[:k, :n]
    if layout == "s4_k8":
        nb, k8, _ = packed.shape
        shifts = (4 * jnp.arange(8, dtype=jnp.uint32)).reshape(1, 1, 1, 8)
        nib = ((packed[..., None] >> shifts) & 0xF).astype(jnp.int8)  # (nb, k8, 16, 8)
        vals = (nib ^ 8) - 8
        return jnp.transpose(vals, (1, 3, 0, 2)).reshape(k8 * 8, nb * 16)[:k, :n]
    raise ValueError(f"layout: expected one of {tuple(LAYOUTS.values())}, got {layout!r}")
