"""IEEE-exact float32 helpers that XLA:CPU would otherwise rewrite.

XLA:CPU turns ``x / c`` for a scalar or broadcast ``c`` into ``x * (1/c)`` (one ulp off in ~70% of
cases) and contracts ``a * b + c`` into an FMA. torch does neither in the places we match, so these
helpers hide the operands behind an optimization barrier, which XLA cannot see through.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def exact_divide(numerator: jnp.ndarray, denominator: jnp.ndarray | float) -> jnp.ndarray:
    """``numerator / denominator`` with IEEE float32 division, even for a scalar denominator."""
    numerator = jnp.asarray(numerator)
    shape = jnp.broadcast_shapes(numerator.shape, jnp.shape(denominator))
    dtype = jnp.result_type(numerator, denominator)
    den = jnp.broadcast_to(jnp.asarray(denominator, dtype), shape)
    num = jnp.broadcast_to(numerator.astype(dtype), shape)
    num, den = lax.optimization_barrier((num, den))
    return num / den


def unfused_multiply(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """``a * b`` rounded to float32 before any following add (no FMA contraction)."""
    return lax.optimization_barrier(a * b)
