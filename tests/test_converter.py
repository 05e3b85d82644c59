"""jquant.convert on whole functions: agreement with the fake-quant eval function, bytes, dropped float weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import export_int_fn, load_exported, load_int_params, presets, save_int_params
from jquant.kernels import QuantizedWeight

RNG = np.random.default_rng(0)


def _mlp_params(sizes=(64, 48, 10)):
    return {
        f"l{i}": {"w": jnp.asarray(RNG.standard_normal((a, b)) / np.sqrt(a), jnp.float32),
                  "b": jnp.asarray(RNG.standard_normal(b) * 0.1, jnp.float32)}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    }


def mlp(params, x):
    h = jax.nn.relu(x @ params["l0"]["w"] + params["l0"]["b"])
    return h @ params["l1"]["w"] + params["l1"]["b"]


def _calibrated(fn, config, params, x):
    qf = jquant.quantize(fn, config)
    qstate = qf.init(params, x)
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")
    return qf, qstate


CONFIGS = {
    "static": (None, 1e-5),
    "dynamic": (presets.int8_dynamic(), 1e-5),
    "weight_only_int8": (presets.int8_weight_only(), 1e-5),
    "weight_only_int4": (presets.int4_weight_only(16), 1e-5),
    "qat_lsq": (presets.qat_int8(lsq=True), 1e-5),  # learnt qparams: float zero point rounded half to even
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mlp_matches_eval_and_drops_float_weights(name):
    config, tol = CONFIGS[name]
    params, x = _mlp_params(), jnp.asarray(RNG.standard_normal((6, 64)), jnp.float32)
    qf, qstate = _calibrated(mlp, config, params, x)
    expected, _ = qf.apply(qstate, params, x, mode="eval")
    int_fn, int_params = jquant.convert(qf, qstate, params, x, weight_only_impl="dequantize")
    got = int_fn(int_params, x)
    np.testing.assert_allclose(got, expected, atol=tol * 10, rtol=tol)
    assert int_params["params"]["l0"]["w"] is None and int_params["params"]["l1"]["w"] is None
    weights = [leaf for leaf in jax.tree.leaves(int_params["sites"], is_leaf=lambda v: isinstance(v, QuantizedWeight))
               if isinstance(leaf, QuantizedWeight)]
    assert len(weights) == 2
    # One integer copy per weight: XLA's layout, or only the native kernels' packed one.
    assert all((w.qvalue is None) != (w.kernel_data is None) for w in weights)
    assert all(w.int_values().dtype == jnp.int8 for w in weights)
    assert int_fn.report.ratio > (3.0 if "int4" not in name else 4.0)


def test_static_int_output_within_one_output_step_of_eval():
    """uint8 activations (torch's x86 default); the output step is that of a uint8 quantizer of the output."""
    params, x = _mlp_params((64, 256, 32)), jnp.asarray(RNG.standard_normal((16, 64)), jnp.float32)
    qf, qstate = _calibrated(mlp, presets.int8_static(activation_dtype="uint8"), params, x)
    expected, _ = qf.apply(qstate, params, x, mode="eval")
    int_fn, int_params = jquant.convert(qf, qstate, params, x)
    got = int_fn(int_params, x)
    step = float((expected.max() - jnp.minimum(expected.min(), 0)) / 255)
    assert float(jnp.max(jnp.abs(got - expected))) <= step


def test_dynamic_weight_only_cpu_path_is_close():
    params, x = _mlp_params(), jnp.asarray(RNG.standard_normal((1, 64)), jnp.float32)
    qf, qstate = _calibrated(mlp, presets.int8_weight_only(), params, x)
    expected, _ = qf.apply(qstate, params, x, mode="eval")
    int_fn, int_params = jquant.convert(qf, qstate, params, x, weight_only_impl="dynamic")
    np.testing.assert_allclose(int_fn(int_params, x), expected, atol=0.05 * float(jnp.max(jnp.abs(expected))))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
        x = nn.Conv(16, (3, 3), feature_group_count=4)(x)  # grouped conv: lax conv path
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10)(x)


@pytest.mark.parametrize("config", [None, presets.int8_dynamic()], ids=["static", "dynamic"])
def test_linen_cnn_matches_eval(config):
    model = CNN()
    x = jnp.asarray(RNG.standard_normal((4, 12, 12, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    qf, qstate = _calibrated(model.apply, config, variables, x)
    expected, _ = qf.apply(qstate, variables, x, mode="eval")
    int_fn, int_params = jquant.convert(qf, qstate, variables, x)
    got = int_fn(int_params, x)
    np.testing.assert_allclose(got, expected, atol=1e-4 * float(jnp.max(jnp.abs(expected))) + 1e-5)
    kernels = jax.tree.leaves(int_params["params"])
    assert all(k.ndim == 1 for k in kernels)  # only biases remain in float
    assert set(int_fn.report.site_kinds.values()) == {"static" if config is None else "dynamic"}


def test_scan_stacked_layers_convert_per_layer():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.relu(nn.Dense(32)(h)), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(x, None)
            return h

    model = Stack()
    x = jnp.asarray(RNG.standard_normal((5, 32)), jnp.float32)
    variables = model.init(jax.random.key(1), x)
    qf, qstate = _calibrated(model.apply, None, variables, x)
    expected, _ = qf.apply(qstate, variables, x, mode="eval")
    int_fn, int_params = jquant.convert(qf, qstate, variables, x)
    np.testing.assert_allclose(int_fn(int_params, x), expected, atol=1e-4)
    (qw,) = [v for v in jax.tree.leaves(int_params["sites"], is_leaf=lambda v: isinstance(v, QuantizedWeight))
             if isinstance(v, QuantizedWeight)]
    stored = qw.qvalue if qw.qvalue is not None else qw.kernel_data
    assert stored.shape[0] == 3 and qw.scale.shape == (3, 1, 32)  # one set of int weights per layer
    # The stacked [3, 32] bias is one 1-D bias per layer: not reported as a float matrix left behind.
    assert [s.site for s in int_fn.report.sites if s.kind == "float"] == []


def test_tied_weight_used_elsewhere_is_kept_in_float():
    params = {"emb": jnp.asarray(RNG.standard_normal((20, 16)), jnp.float32)}

    def tied(p, ids):
        h = p["emb"][ids]  # gather: not a quantized site
        return h @ p["emb"].T

    ids = jnp.arange(6)
    qf, qstate = _calibrated(tied, None, params, ids)
    expected, _ = qf.apply(qstate, params, ids, mode="eval")
    int_fn, int_params = jquant.convert(qf, qstate, params, ids)
    assert int_params["params"]["emb"] is not None
    np.testing.assert_allclose(int_fn(int_params, ids), expected, atol=1e-4)


def test_converted_params_round_trip_and_export(tmp_path):
    params, x = _mlp_params(), jnp.asarray(RNG.standard_normal((2, 64)), jnp.float32)
    qf, qstate = _calibrated(mlp, None, params, x)
    int_fn, int_params = jquant.convert(qf, qstate, params, x)
    save_int_params(tmp_path / "p.safetensors", int_params)
    loaded = load_int_params(tmp_path / "p.safetensors")
    np.testing.assert_array_equal(int_fn(loaded, x), int_fn(int_params, x))
    exported = load_exported(export_int_fn(int_fn, int_params, x))
    assert "xi8>" in exported.exported.mlir_module()
    np.testing.assert_array_equal(exported(loaded, x), int_fn(int_params, x))


def test_convert_rejects_foreign_qstate():
    params, x = _mlp_params(), jnp.ones((2, 64))
    qf, qstate = _calibrated(mlp, None, params, x)
    with pytest.raises(ValueError, match="missing sites"):
        jquant.convert(qf, {"other": {}}, params, x)


def test_derived_int32_bias_converts_and_matches_eval():
    """PT2E's derived bias spec (int32, scale = input scale x weight scale, read from the producing dot): the
    converted function keeps the weight qparams it derives from and rounds the bias to that grid, as eval."""
    from jquant.transform.specs import DerivedQuantizationSpec

    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32),
         "b": jnp.asarray(rng.standard_normal(8) * 0.37, jnp.float32)}
    x = jnp.asarray(rng.standard_normal((32, 16)), jnp.float32)
    bias = DerivedQuantizationSpec(("producer:input", "producer:weight"), dtype="int32")
    config = [jquant.Rule(weight=jquant.QuantizationSpec("int8", "per_channel_symmetric"),
                          inputs=jquant.QuantizationSpec("uint8")),
              jquant.Rule(primitives=("add",), weight=bias)]
    qf = jquant.quantize(lambda p, x: x @ p["w"] + p["b"], config)
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    want = np.asarray(qf.apply(qstate, p, x, mode="eval")[0])
    int_fn, int_params = jquant.convert(qf, qstate, p, x)
    got = np.asarray(int_fn(int_params, x))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the bias really sits on the derived int32 grid: the float bias would differ by more than float rounding
    dot = qf.sites[0].name
    grid = float(qstate[dot]["input"].scale) * np.asarray(qstate[dot]["weight"].scale).reshape(-1)
    rounded = np.round(np.asarray(p["b"]) / grid) * grid
    assert np.abs(rounded - np.asarray(p["b"])).max() > 1e-4
    float_bias = want - rounded + np.asarray(p["b"])
    assert np.abs(got - float_bias).max() > 1e-4
