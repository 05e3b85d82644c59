"""Fused patterns, implicit qparam sharing and the Quantizer protocol (jquant/transform/{patterns,quantizer}.py)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jquant
from jquant.transform import Annotation, Quantizer, View
from jquant.transform.quantizer import VALUE_PRESERVING, RuleQuantizer

A8 = jquant.QuantizationSpec("uint8", observer="minmax")
W8 = jquant.QuantizationSpec("int8", "per_channel_symmetric")


def mlp(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    r = jnp.maximum(h @ p["w2"] + p["b2"] + h, 0.0)  # add + relu spelled with max
    return r.reshape(r.shape[0], 2, -1).reshape(r.shape[0], -1) @ p["w3"]


def _params():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    return {
        "w1": jax.random.normal(k[0], (6, 8)), "b1": jnp.linspace(-1, 1, 8),
        "w2": jax.random.normal(k[1], (8, 8)), "b2": jnp.linspace(1, -1, 8),
        "w3": jax.random.normal(k[2], (8, 3)),
    }


class Backend(Quantizer):
    primitives = ("dot_general", "add")
    fuse = True
    share_through = VALUE_PRESERVING

    def annotate(self, site):
        if site.primitive == "add":
            return Annotation(inputs=A8, output=A8)
        if site.param_paths[-1] == "w3":
            return Annotation(weight=W8, inputs=A8)  # classifier: no output observer
        return Annotation(weight=W8, inputs=A8, output=A8)


def test_custom_quantizer_fuses_bias_relu_and_add_relu():
    p, x = _params(), jax.random.normal(jax.random.PRNGKey(1), (5, 6))
    qf = jquant.quantize(mlp, Backend())
    qstate = qf.init(p, x)
    fused = {s.name: s.fused for s in qf.sites}
    assert fused == {"w1/dot_general": ("add", "relu"), "w2/dot_general": ("add",), "add": ("relu",),
                     "w3/dot_general": ()}
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    y2 = h @ p["w2"] + p["b2"]
    # Output observers see the tensor after the bias add (and after the ReLU), as torch's LinearReLU.
    assert float(qstate["w1/dot_general"]["output"].observer.min_val) == 0.0
    assert float(qstate["w1/dot_general"]["output"].observer.max_val) == float(h.max())
    assert float(qstate["w2/dot_general"]["output"].observer.min_val) == float(y2.min())
    assert float(qstate["add"]["output"].observer.max_val) == float(jnp.maximum(y2 + h, 0).max())
    # Inputs already quantized by a producer reuse its qparams: no observer of their own.
    assert set(qstate["w2/dot_general"]) == {"weight", "output"}
    assert set(qstate["add"]) == {"output"}
    w3_input = next(s for s in qf.sites if s.name == "w3/dot_general").operand("input").spec
    assert isinstance(w3_input, jquant.SharedQuantizationSpec) and w3_input.site == "add"
    # The reshape chain is one view (one observation), ending at the reshape feeding the classifier.
    views = [v for v in qf.plan(p, x).by_eqn.values() if isinstance(v, View)]
    assert [(v.name, v.primitive) for v in views] == [
        ("w1/dot_general", "custom_jvp_call"), ("w2/dot_general", "add"), ("add", "max"), ("add", "reshape")]
    out, _ = qf.apply(qstate, p, x, mode="eval")
    assert np.isfinite(np.asarray(out)).all()


def test_rule_lists_keep_their_meaning():
    # Without graph options, a rule list behaves as before: output observed at the dot itself, bias add a site.
    p, x = _params(), jnp.ones((2, 6))
    config = [jquant.Rule(primitives=("dot_general", "add"), weight=W8, inputs=A8, output=A8)]
    qf = jquant.quantize(mlp, config)
    qf.init(p, x)
    assert all(s.fused == () for s in qf.sites)
    assert sum(s.primitive == "add" for s in qf.sites) == 3  # two bias adds + the residual add


def test_fused_output_needs_a_static_per_tensor_spec():
    bad = jquant.QuantizationSpec("uint8", "per_channel_affine", ch_axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qf = jquant.quantize(
            mlp, jquant.RuleQuantizer([jquant.Rule(weight=W8, inputs=A8, output=bad)], fuse=True))
    with pytest.raises(ValueError, match=r"site 'w1/dot_general'.*fused dot_general\+add\+relu"):
        qf.init(_params(), jnp.ones((2, 6)))


def test_quantize_refuses_other_config_types():
    with pytest.raises(TypeError, match="Quantizer, a Rule or a list of Rules"):
        jquant.quantize(mlp, {"weight": W8})


def test_fixed_qparams_quantization_spec_is_the_pt2e_name():
    assert jquant.FixedQParamsQuantizationSpec is jquant.FixedQParamsSpec

    def fn(p, x):
        return jax.nn.sigmoid(x @ p["w"])

    p, x = {"w": jnp.ones((3, 2))}, jnp.linspace(-4, 4, 12).reshape(4, 3)
    qf = jquant.quantize(fn, jquant.presets.torch_x86())
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    out, _ = qf.apply(qstate, p, x, mode="eval")
    logistic = next(s for s in qf.sites if s.primitive == "logistic")
    assert logistic.output_spec == jquant.FixedQParamsQuantizationSpec(1 / 256, 0, "uint8")
    np.testing.assert_array_equal(np.asarray(out) * 256, np.round(np.asarray(out) * 256))


def _conv_bn(p, x):
    y = lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.nn.relu((y - p["mean"]) * p["gamma"] / jnp.sqrt(p["var"] + 1e-5) + p["beta"])


def test_plain_batchnorm_is_folded_into_the_kernel_as_torch_folds_it():
    torch = pytest.importorskip("torch")
    rng = np.random.RandomState(0)
    p = {
        "w": rng.randn(3, 3, 2, 5).astype(np.float32), "mean": rng.randn(5).astype(np.float32),
        "var": rng.uniform(0.1, 2, 5).astype(np.float32), "gamma": rng.randn(5).astype(np.float32),
        "beta": rng.randn(5).astype(np.float32),
    }
    x = jnp.asarray(rng.randn(2, 6, 6, 2).astype(np.float32))
    qf = jquant.quantize(_conv_bn, jquant.presets.torch_x86())
    qstate = qf.init(p, x)
    conv = qf.sites[0]
    assert conv.fused == ("add", "relu") and conv.operand("weight").param_path == "w"
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    folded, _ = torch.nn.utils.fusion.fuse_conv_bn_weights(
        torch.from_numpy(p["w"].transpose(3, 2, 0, 1).copy()), None, torch.from_numpy(p["mean"]),
        torch.from_numpy(p["var"]), 1e-5, torch.from_numpy(p["gamma"]), torch.from_numpy(p["beta"]))
    folded = folded.detach().numpy().reshape(5, -1)
    observer = qstate[conv.name]["weight"].observer
    np.testing.assert_array_equal(np.asarray(observer.min_val), folded.min(1))
    np.testing.assert_array_equal(np.asarray(observer.max_val), folded.max(1))
    # The folded function computes what the original does (float rounding apart).
    quantizer = jquant.RuleQuantizer([], fold_batchnorm=True)
    out, _ = jquant.quantize(_conv_bn, quantizer).apply({}, p, x, mode="eval")
    np.testing.assert_allclose(np.asarray(out), np.asarray(_conv_bn(p, x)), rtol=1e-5, atol=1e-5)


def test_derived_spec_over_any_earlier_site():
    def fn(p, x):
        h = x @ p["w1"]
        return h @ p["w2"] + p["b"]

    p = {"w1": jnp.eye(3) * 0.5, "w2": jnp.eye(3), "b": jnp.array([0.013, -0.27, 1.0])}
    x = jnp.linspace(-1, 1, 6).reshape(2, 3)
    derived = jquant.DerivedQuantizationSpec(("w1/dot_general:output",), dtype="int32")
    config = [
        jquant.Rule(weight=None, output=A8),
        jquant.Rule(primitives=("add",), weight=derived),
    ]
    qf = jquant.quantize(fn, config)
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    out, _ = qf.apply(qstate, p, x, mode="eval")
    scale = float(qstate["w1/dot_general"]["output"].scale)
    h = jquant.fake_quantize_affine(x @ p["w1"], scale, int(qstate["w1/dot_general"]["output"].zero_point),
                                    dtype="uint8")
    second = qstate["w2/dot_general"]["output"]
    y = jquant.fake_quantize_affine(h @ p["w2"], second.scale, second.zero_point, dtype="uint8")
    np.testing.assert_allclose(np.asarray(out), np.asarray(y + jnp.round(p["b"] / scale) * scale), rtol=1e-6)
    bad = [jquant.Rule(primitives=("add",), weight=jquant.DerivedQuantizationSpec(("nowhere:output",)))]
    with pytest.raises(ValueError, match="no earlier site 'nowhere'"):
        jquant.quantize(fn, bad).init(p, x)


def test_a_normalization_mean_is_not_an_average_pool():
    """torch_x86's sharing covers a pooled mean's qparams, but the mean inside a LayerNorm (subtracted from
    the value it averages) stays float, as torch's LayerNorm never quantizes its statistics."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(16)(x)
            h = h + nn.Dense(16)(h)  # a quantized add: h carries its qparams
            pooled = jnp.mean(h, axis=0, keepdims=True)  # a mean pool (torch.mean): shares them
            return nn.Dense(4)(nn.LayerNorm()(h)) + nn.Dense(4)(pooled)

    x = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
    variables = Block().init(jax.random.PRNGKey(0), x)
    # torch_x86's graph options with MinMax observers (quick to compile; the placement is the same).
    rules = [jquant.Rule(weight=W8, inputs=A8, output=A8), jquant.Rule(primitives=("add",), inputs=A8, output=A8)]
    quantizer = RuleQuantizer(rules, fuse=True, share_through=jquant.presets.torch_x86().share_through)
    qf = jquant.quantize(Block().apply, quantizer)
    qstate = qf.init(variables, x)
    views = [v for v in qf.plan(variables, x).by_eqn.values() if isinstance(v, View)]
    assert [(v.name, v.primitive) for v in views if v.primitive == "mean"] == [("Block/add", "mean")]
    # Converted, the pooled mean (keepdims) runs on the add's integers: the same values as eval's fake quant.
    _, qstate = qf.apply(qstate, variables, x, mode="calibrate")
    expected, _ = qf.apply(qstate, variables, x, mode="eval")
    int_fn, int_params = jquant.convert(qf, qstate, variables, x)
    np.testing.assert_allclose(np.asarray(int_fn(int_params, x)), np.asarray(expected), atol=1e-5)
