"""The IEEE-exact helpers of jquant.numerics.exact keep their rounding once XLA:CPU compiles them."""

import jax
import numpy as np

from jquant.numerics.exact import fused_multiply_add, unfused_multiply


def test_unfused_multiply_is_not_contracted_into_an_fma_under_jit():
    """XLA:CPU contracts ``a * b + c`` into an FMA (one rounding) and drops optimization barriers; the helpers that
    reproduce torch's two roundings must survive compilation."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(1 << 16).astype(np.float32) for _ in range(3))
    two_roundings = (a * b) + c
    one_rounding = (a.astype(np.float64) * b + c).astype(np.float32)
    assert (two_roundings != one_rounding).any()  # the input tells the two apart
    got = jax.jit(lambda a, b, c: unfused_multiply(a, b) + c)(a, b, c)
    np.testing.assert_array_equal(np.asarray(got), two_roundings)
    np.testing.assert_array_equal(np.asarray(jax.jit(fused_multiply_add)(a, b, c)), one_rounding)
