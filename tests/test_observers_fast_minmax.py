"""``finite_aminmax``'s fast paths (one fused pass / guarded plain reductions) equal the masked definition.

Non-finite values anywhere (NaN, +inf, -inf, one or many, next to the extremes) must fall back to the masked
reductions; XLA:CPU's plain min / max kernels drop NaN, so this is where a wrong guard would show.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.observers._base import finite_aminmax


def _reference(x: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray]:
    finite = np.isfinite(x)
    lo = np.min(np.where(finite, x, np.inf), axis=axis)
    hi = np.max(np.where(finite, x, -np.inf), axis=axis)
    return lo, hi


CASES = [
    ((256, 1024), None),  # per tensor: one variadic reduce
    ((64, 300), 1),  # per channel on a leading axis (rows)
    ((784, 96), 0),  # per output channel of an (in, out) kernel: guarded YNNPACK reductions
    ((4, 6, 33), (0, 2)),  # a middle channel axis
    ((7, 13), None),
    ((5,), ()),  # no reduction at all
]


@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_fast_paths_equal_masked_definition(shape, axis):
    rng = np.random.default_rng(sum(shape))
    base = rng.standard_normal(shape).astype(np.float32) * 3
    fn = jax.jit(lambda v: finite_aminmax(v, axis))
    trials = [base]
    for bad in (np.nan, np.inf, -np.inf):
        for count in (1, 3):
            x = base.copy()
            x.reshape(-1)[rng.integers(0, x.size, count)] = bad
            trials.append(x)
    x = base.copy()
    x.reshape(-1)[np.argmin(x)] = np.nan  # a NaN where the minimum was: the next one is the answer
    x.reshape(-1)[np.argmax(x)] = np.nan
    trials.append(x)
    trials.append(np.full(shape, np.nan, np.float32))
    trials.append(np.full(shape, 3e38, np.float32))  # finite, but the guard's sum overflows: masked path
    for x in trials:
        lo, hi = fn(x)
        want_lo, want_hi = _reference(x, axis)
        np.testing.assert_array_equal(np.asarray(lo), want_lo)
        np.testing.assert_array_equal(np.asarray(hi), want_hi)


def test_vmap_and_empty():
    x = np.random.default_rng(0).standard_normal((3, 40, 8)).astype(np.float32)
    x[1, 5, 2] = np.nan  # only one member of the batch is non-finite
    lo, hi = jax.vmap(lambda v: finite_aminmax(v, 0))(jnp.asarray(x))
    want = [_reference(v, 0) for v in x]
    np.testing.assert_array_equal(np.asarray(lo), np.stack([w[0] for w in want]))
    np.testing.assert_array_equal(np.asarray(hi), np.stack([w[1] for w in want]))
    lo, hi = finite_aminmax(jnp.zeros((0, 4)), 0)
    assert np.all(np.isposinf(lo)) and np.all(np.isneginf(hi))


def test_one_pass_for_a_per_tensor_observer():
    """A per-tensor observer of ``relu(x + b)`` compiles to one fused reduce over ``x``; the only full-size array
    written is ``relu(x + b)`` itself (the operand of the non-finite fallback), not a filtered copy per reduction."""
    x = jnp.ones((64, 128))
    b = jnp.ones(128)
    hlo = jax.jit(lambda v, c: finite_aminmax(jax.nn.relu(v + c))).lower(x, b).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):].splitlines()
    written = [line for line in entry if "= f32[64,128]" in line and " fusion(" in line]
    reduces = [line for line in entry if " fusion(" in line and "(f32[], f32[], pred[])" in line]
    assert len(written) <= 1 and len(reduces) == 1, entry
