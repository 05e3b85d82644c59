"""IEEE-exact float32 helpers that XLA:CPU would otherwise rewrite.

XLA:CPU turns ``x / c`` for a scalar or broadcast ``c`` into ``x * (1/c)`` (one ulp off in ~70% of
cases) and contracts ``a * b + c`` into an FMA. torch does neither in the places we match. A division hides
its operands behind an optimization barrier; a product is passed through ``opaque``, a select on a condition
no compiler can decide, because XLA:CPU drops optimization barriers from compiled programs before LLVM
contracts ``fmul`` + ``fadd`` (measured: 23% of ``barrier(a * b) + c`` results were FMAs).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def exact_divide(numerator: jnp.ndarray, denominator: jnp.ndarray | float) -> jnp.ndarray:
    """``numerator / denominator`` with IEEE float32 division, even for a scalar denominator."""
    numerator = jnp.asarray(numerator)
    shape = jnp.broadcast_shapes(numerator.shape, jnp.shape(denominator))
    dtype = jnp.result_type(numerator, denominator)
    num = jnp.broadcast_to(numerator.astype(dtype), shape)
    den = jnp.broadcast_to(jnp.asarray(denominator, dtype), shape)
    # A data dependency on num gives the divisor num's batch dims under vmap, so no broadcast follows the barrier.
    den = jnp.where(jnp.isnan(num), den, den)
    num, den = lax.optimization_barrier((num, den))
    return num / den


def opaque(x: jnp.ndarray) -> jnp.ndarray:
    """``x`` unchanged, through a select the compiler cannot fold (NaN stays NaN): a following add cannot be
    contracted with the multiply that produced ``x``."""
    return jnp.where(jnp.isnan(x), x + 1, x)


def unfused_multiply(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """``a * b`` rounded to float32 before any following add (no FMA contraction)."""
    return opaque(a * b)


def _split(a: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Veltkamp split of float32 ``a`` into two 12-bit halves, ``a == hi + lo`` exactly."""
    t = opaque(a * jnp.float32(4097.0))  # keep t - a from becoming an FMA
    hi = t - (t - a)
    return hi, a - hi


def two_sum(a: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``a + b == s + e`` exactly, ``s`` the float32 sum (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def two_product(a: jnp.ndarray, b: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``a * b == p + e`` exactly (barring overflow), ``p`` the float32 product (Dekker)."""
    p = opaque(a * b)
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    e = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    return p, e


def product_of_difference(a: jnp.ndarray, b: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    """``(a - b) * c`` rounded once to float32 from (nearly) exact arithmetic.

    torch evaluates some fake-quant expressions in double precision and rounds the result to float32
    once; this reproduces that without float64 (which JAX disables by default).
    """
    d_hi, d_lo = two_sum(a, -b)
    p, e = two_product(d_hi, c)
    return p + (e + d_lo * c)


def fused_multiply_add(a: jnp.ndarray, b: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    """``a * b + c`` with a single rounding, as a compiled FMA does, independent of compiler contraction."""
    p, e = two_product(a, b)
    s, s_err = two_sum(p, c)
    return s + (s_err + e)
