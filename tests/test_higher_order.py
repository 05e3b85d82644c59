"""The rule table of higher-order primitives: one entry per primitive, each run against the inlined function.

For every rule, a dot inside the higher-order primitive is discovered as a site (named, with its weight) and
calibrating through the primitive gives the same observer range as the same dot written without it.
"""

import jax
import jax.extend.core.primitives as prims
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import quantize
from jquant.transform import UnsupportedPrimitiveError
from jquant.transform.higher_order import RULES, rule_for

RNG = np.random.default_rng(5)
W = jnp.asarray(RNG.standard_normal((4, 3)), jnp.float32)
X = jnp.asarray(RNG.standard_normal((2, 4)), jnp.float32)


def plain(p, x):
    return x @ p["w"]


@jax.custom_jvp
def _jvp_body(x, w):
    return x @ w


_jvp_body.defjvp(lambda primals, tangents: (_jvp_body(*primals), tangents[0] @ primals[1] + primals[0] @ tangents[1]))


@jax.custom_vjp
def _vjp_body(x, w):
    return x @ w


_vjp_body.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, res[0].T @ g))

WRAPPED = {
    prims.jit_p: lambda p, x: jax.jit(plain)(p, x),
    prims.remat_p: lambda p, x: jax.checkpoint(plain)(p, x),
    prims.custom_jvp_call_p: lambda p, x: _jvp_body(x, p["w"]),
    prims.custom_vjp_call_p: lambda p, x: _vjp_body(x, p["w"]),
    prims.scan_p: lambda p, x: jax.lax.scan(lambda c, _: (c, c @ p["w"]), x, None, length=1)[1][0],
    prims.cond_p: lambda p, x: jax.lax.cond(x[0, 0] < 100, lambda v: v @ p["w"], lambda v: jnp.zeros((2, 3)), x),
    prims.while_p: lambda p, x: jax.lax.while_loop(lambda c: c[0] < 1, lambda c: (c[0] + 1, x @ p["w"]),
                                                   (0, jnp.zeros((2, 3))))[1],
}


def _primitives_in(fn):
    jaxpr = jax.make_jaxpr(fn)({"w": W}, X).jaxpr
    return {eqn.primitive for eqn in jaxpr.eqns}


@pytest.mark.parametrize("primitive", sorted(WRAPPED, key=lambda p: p.name), ids=lambda p: p.name)
def test_each_rule_discovers_and_calibrates_the_inner_site(primitive):
    fn = WRAPPED[primitive]
    assert primitive in _primitives_in(fn) and rule_for(primitive) is not None
    qf = quantize(fn)
    qstate = qf.init({"w": W}, X)
    (site,) = qf.sites
    assert site.operand("weight").param_path == "w"
    _, qstate = qf.apply(qstate, {"w": W}, X, mode="calibrate")
    ref = quantize(plain)
    ref_state = ref.init({"w": W}, X)
    _, ref_state = ref.apply(ref_state, {"w": W}, X, mode="calibrate")
    got = jax.tree_util.tree_map(lambda v: v.reshape(v.shape[-1:] if v.ndim else ()), qstate[site.name])
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, ref_state["w/dot_general"])
    out, _ = qf.apply(qstate, {"w": W}, X, mode="eval")
    expected, _ = ref.apply(ref_state, {"w": W}, X, mode="eval")
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_every_rule_in_the_table_is_tested():
    untested = {p.name for p in RULES} - {p.name for p in WRAPPED} - {"closed_call", "call", "shard_map"}
    assert not untested  # shard_map: tests/test_transform_mesh.py; call / closed_call share jit's rule


def test_unknown_higher_order_primitive_is_a_clear_error():
    def fn(p, x):  # custom_linear_solve carries sub-jaxprs jquant has no rule for
        return jax.lax.custom_linear_solve(lambda v: v, (x @ p["w"])[0], lambda mv, b: b)

    with pytest.raises(UnsupportedPrimitiveError, match="custom_linear_solve|linear_solve"):
        quantize(fn).init({"w": W}, X)
