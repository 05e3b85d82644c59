"""Rules and specs (elementwise sites, fixed / shared / derived specs, first match wins) and clear errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jquant import presets
from jquant.numerics.affine import fake_quantize_affine
from jquant.numerics.qparams import choose_qparams
from jquant.transform import (
    DerivedQuantizationSpec,
    FixedQParamsSpec,
    QuantizationSpec,
    Rule,
    SharedQuantizationSpec,
    UnsupportedPrimitiveError,
    quantize,
)

ACT = QuantizationSpec("int8", "per_tensor_affine")
WEIGHT = QuantizationSpec("int8", "per_channel_symmetric")


def qparams(lo, hi, dtype="int8", qscheme="per_tensor_affine"):
    return choose_qparams(jnp.float32(lo), jnp.float32(hi), dtype=dtype, qscheme=qscheme)


def setup(seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    p = {"w": jax.random.normal(k[0], (4, 6)), "b": jax.random.normal(k[1], (6,)), "v": jax.random.normal(k[2], (4, 6))}
    return p, jax.random.normal(k[3], (3, 4))


def test_first_matching_rule_wins_and_none_rule_keeps_float():
    p, x = setup()

    def fn(p, x):
        return jnp.tanh(x @ p["w"]) + x @ p["v"]

    config = [Rule(pattern=r"^v/"), Rule(weight=WEIGHT, inputs=ACT), Rule(pattern="w", weight=None)]
    with pytest.warns(UserWarning, match=r"matched no site.*pattern='w'"):
        qf = quantize(fn, config)
        qstate = qf.init(p, x)
    assert set(qstate) == {"w/dot_general"}  # v is excluded by the first rule; the third rule never wins
    assert [s.quantized for s in qf.sites] == [True, False]
    with pytest.raises(ValueError, match="matched no site"):
        quantize(fn, config, strict=True).init(p, x)


def test_elementwise_sites_shared_and_fixed_specs():
    p, x = setup()

    def fn(p, x):
        a, b = x @ p["w"], x @ p["v"]
        cat = jnp.concatenate([a, b * 2], axis=1)
        return jax.nn.sigmoid(cat)

    config = [
        Rule(primitives=("concatenate",), inputs=(ACT, SharedQuantizationSpec("input0"))),
        Rule(primitives=("logistic",), output=FixedQParamsSpec(1 / 256, 0, "uint8")),
    ]
    qf = quantize(fn, config)
    qstate = qf.init(p, x)
    names = [s.name for s in qf.sites]
    assert "concatenate" in names and "logistic" in names
    assert set(qstate["concatenate"]) == {"input0"}  # the shared input has no state of its own
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    a, b = x @ p["w"], x @ p["v"] * 2
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())  # one observer sees both inputs
    np.testing.assert_allclose(qstate["concatenate"]["input0"].observer.min_val, lo)
    out, _ = qf.apply(qstate, p, x, mode="eval")
    s, z = qparams(lo, hi)
    cat = jnp.concatenate([fake_quantize_affine(a, s, z), fake_quantize_affine(b, s, z)], axis=1)
    ref = fake_quantize_affine(jax.nn.sigmoid(cat), 1 / 256, 0, dtype="uint8")
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    assert len(np.unique(np.round(np.asarray(out) * 256))) > 3


def test_derived_int32_bias_scale():
    p, x = setup()

    def fn(p, x):
        return x @ p["w"] + p["b"]

    bias = DerivedQuantizationSpec(("producer:input", "producer:weight"))
    config = [Rule(weight=WEIGHT, inputs=ACT), Rule(primitives=("add",), weight=bias)]
    qf = quantize(fn, config)
    qstate = qf.init(p, x)
    add_site = qf.sites[1]
    assert add_site.roles == ("input", "weight") and add_site.operand("input").producer == "w/dot_general"
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    out, _ = qf.apply(qstate, p, x, mode="eval")
    sx, zx = qparams(x.min(), x.max())
    sw, zw = choose_qparams(p["w"].min(0), p["w"].max(0), dtype="int8", qscheme="per_channel_symmetric")
    dot = fake_quantize_affine(x, sx, zx) @ fake_quantize_affine(p["w"], sw, zw, axis=1)
    bias_q = fake_quantize_affine(p["b"], sx * sw, jnp.zeros(6, jnp.int32), dtype="int32", axis=0)
    np.testing.assert_allclose(out, dot + bias_q, rtol=1e-6, atol=1e-6)


def test_per_channel_multi_axis_einsum_kernel():
    k = jax.random.split(jax.random.key(1), 2)
    w = jax.random.normal(k[0], (8, 2, 3))  # (d_model, heads, head_dim)
    x = jax.random.normal(k[1], (5, 8))
    qf = quantize(lambda w, x: jnp.einsum("bd,dhk->bhk", x, w), presets.int8_weight_only())
    qstate = qf.init(w, x)
    assert qf.sites[0].operand("weight").out_axes == (1, 2)
    _, qstate = qf.apply(qstate, w, x, mode="calibrate")
    out, _ = qf.apply(qstate, w, x, mode="eval")
    s, z = choose_qparams(w.min(0), w.max(0), dtype="int8", qscheme="per_channel_symmetric")  # (2, 3)
    wq = fake_quantize_affine(w, s[None], z[None], block_size=(8, 1, 1))
    np.testing.assert_allclose(out, jnp.einsum("bd,dhk->bhk", x, wq), rtol=1e-6, atol=1e-6)


def test_weights_detected_by_data_flow_not_shape():
    k = jax.random.split(jax.random.key(2), 2)
    w, x = jax.random.normal(k[0], (4, 4)), jax.random.normal(k[1], (4, 4))  # same shapes
    qf = quantize(lambda w, x: x @ w.T.astype(jnp.float32).reshape(4, 4) + (x * 2) @ x)
    qf.init(w, x)
    assert [s.roles for s in qf.sites] == [("input", "weight"), ("input", "input")]
    assert qf.sites[0].operand("weight").param_path == "arg0"
    # Through a jit boundary (in and out) and a scan's xs, a slice of the weights is still a weight.
    transposed = jax.jit(lambda w: w.T)
    qf = quantize(lambda w, x: lax.scan(lambda c, row: (c, row[None] @ transposed(w)), 0.0, x)[1])
    qf.init(w, x)
    assert [s.roles for s in qf.sites] == [("input", "weight")] and qf.sites[0].operand("weight").out_axes == (1,)


# -- errors --------------------------------------------------------------------------------------------------


def test_unknown_higher_order_primitive_is_named():
    p, x = setup()

    def fn(p, x):
        m = jnp.eye(4) * 2.0
        y = lax.custom_linear_solve(lambda v: m @ v, x[0], solve=lambda mv, b: b / 2.0)
        return x @ p["w"] + y.sum()

    with pytest.raises(UnsupportedPrimitiveError, match="custom_linear_solve"):
        quantize(fn).init(p, x)
    qf = quantize(fn, [])  # nothing to quantize: nothing to look inside
    np.testing.assert_allclose(qf.apply(qf.init(p, x), p, x)[0], fn(p, x), rtol=1e-6)


def test_qstate_from_another_function_lists_site_names():
    p, x = setup()
    qf1 = quantize(lambda p, x: x @ p["w"])
    qf2 = quantize(lambda p, x: x @ p["v"])
    qstate = qf1.init(p, x)
    qf2.init(p, x)
    with pytest.raises(ValueError, match=r"missing sites \['v/dot_general'\], unexpected sites \['w/dot_general'\]"):
        qf2.apply(qstate, p, x)


def test_qstate_with_wrong_leaf_shape():
    p, x = setup()
    qf = quantize(lambda p, x: x @ p["w"])
    qstate = qf.init(p, x)
    qstate["w/dot_general"]["weight"] = qstate["w/dot_general"]["weight"]._replace(scale=jnp.ones(3))
    with pytest.raises(ValueError, match="w/dot_general"):
        qf.apply(qstate, p, x)


def test_missing_weights_argument():
    p, x = setup()
    with pytest.raises(TypeError, match="params_argnums"):
        quantize(lambda p, x: x @ p["w"], params_argnums=2).init(p, x)
    with pytest.raises(ValueError, match="no floating-point arrays"):
        quantize(lambda idx, x: x[idx]).init(jnp.arange(2), x)


def test_invalid_specs_and_config():
    with pytest.raises(ValueError, match="dtype"):
        QuantizationSpec("int9")
    with pytest.raises(ValueError, match="fake_quant"):
        QuantizationSpec(fake_quant="pact")
    with pytest.raises(ValueError, match="pattern"):
        Rule(pattern="(")
    with pytest.raises(TypeError, match="weight"):
        Rule(weight="int8")
    with pytest.raises(TypeError, match="config"):
        quantize(lambda p, x: x, config="int8")
    p, x = setup()
    bad_share = [Rule(primitives=("add",), inputs=(ACT, SharedQuantizationSpec("input7")))]
    with pytest.raises(ValueError, match="input7"):
        quantize(lambda p, x: x @ p["w"] + x @ p["v"], bad_share).init(p, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(lambda p, x: x @ p["w"]).init(p, x)  # the default preset matches: no warning


def test_observer_by_short_name_histogram():
    from jquant.observers import HistogramObserver

    p, x = setup()
    spec = QuantizationSpec("uint8", "per_tensor_affine", observer="histogram")
    qf = quantize(lambda p, x: x @ p["w"], [Rule(weight=WEIGHT, inputs=spec)])
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    obs = HistogramObserver(dtype="uint8", qscheme="per_tensor_affine")
    expected = obs.calculate_qparams(obs.update(obs.init(x), x))
    got = qstate["w/dot_general"]["input"].scale, qstate["w/dot_general"]["input"].zero_point
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
