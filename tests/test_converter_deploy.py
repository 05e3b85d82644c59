"""A converted function ships: any batch, vmap, jax.export with a symbolic batch, no calibration where none is
needed, an error where it is, NaN rows stay NaN, a per-site report."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import presets

RNG = np.random.default_rng(3)


def mlp(params, x):
    h = jax.nn.relu(x @ params["l0"]["w"] + params["l0"]["b"])
    return h @ params["l1"]["w"] + params["l1"]["b"]


def _params():
    return {
        "l0": {"w": jnp.asarray(RNG.standard_normal((32, 64)) / 6, jnp.float32), "b": jnp.zeros(64, jnp.float32)},
        "l1": {"w": jnp.asarray(RNG.standard_normal((64, 16)) / 8, jnp.float32), "b": jnp.ones(16, jnp.float32)},
    }


def _converted(config=None, batch=64):
    params = _params()
    x = jnp.asarray(RNG.standard_normal((batch, 32)), jnp.float32)
    qf = jquant.quantize(mlp, config)
    qstate = qf.init(params, x)
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")
    int_fn, int_params = jquant.convert(qf, qstate, params, x)
    return qf, qstate, params, int_fn, int_params


@pytest.mark.parametrize("config", [None, presets.int8_dynamic(), presets.int4_weight_only(group_size=16)])
def test_converted_once_runs_at_every_batch_and_under_vmap(config):
    qf, qstate, params, int_fn, int_params = _converted(config, batch=64)
    for batch in (1, 3, 64, 100):
        x = jnp.asarray(RNG.standard_normal((batch, 32)), jnp.float32)
        expected, _ = qf.apply(qstate, params, x, mode="eval")
        np.testing.assert_allclose(int_fn(int_params, x), expected, atol=2e-3, rtol=1e-3)
    xs = jnp.asarray(RNG.standard_normal((5, 2, 32)), jnp.float32)
    stacked = jax.vmap(lambda v: int_fn(int_params, v))(xs)
    looped = jnp.stack([int_fn(int_params, v) for v in xs])
    np.testing.assert_allclose(stacked, looped, atol=1e-5)


def test_export_with_a_symbolic_batch_runs_at_several_batch_sizes():
    _, _, _, int_fn, int_params = _converted()
    (b,) = jax.export.symbolic_shape("b")
    blob = jquant.export_int_fn(int_fn, int_params, jax.ShapeDtypeStruct((b, 32), jnp.float32))
    loaded = jquant.load_exported(blob)
    for batch in (1, 7, 64):
        x = jnp.asarray(RNG.standard_normal((batch, 32)), jnp.float32)
        np.testing.assert_allclose(loaded(int_params, x), int_fn(int_params, x), atol=1e-5)


@pytest.mark.parametrize("config", [presets.int8_dynamic(), presets.int8_weight_only(),
                                    presets.int4_weight_only(group_size=16)])
def test_weight_qparams_need_no_calibration(config):
    """Straight after init, eval and convert quantize the weights with qparams observed on the weights."""
    params = _params()
    x = jnp.asarray(RNG.standard_normal((8, 32)), jnp.float32)
    qf = jquant.quantize(mlp, config)
    qstate = qf.init(params, x)
    out, _ = qf.apply(qstate, params, x, mode="eval")
    _, calibrated = qf.apply(qstate, params, x, mode="calibrate")
    expected, _ = qf.apply(calibrated, params, x, mode="eval")
    np.testing.assert_array_equal(out, expected)
    assert float(jnp.max(jnp.abs(out - mlp(params, x)))) < 0.5  # scale 1 would round every weight to 0
    int_fn, int_params = jquant.convert(qf, qstate, params, x)
    np.testing.assert_allclose(int_fn(int_params, x), expected, atol=2e-3, rtol=1e-3)


def test_static_sites_that_never_ran_are_an_error_at_convert_and_a_warning_at_eval():
    params = _params()
    x = jnp.asarray(RNG.standard_normal((8, 32)), jnp.float32)
    qf = jquant.quantize(mlp)
    qstate = qf.init(params, x)
    with pytest.raises(ValueError, match=r"never ran.*l0/w/dot_general \(input\).*l1/w/dot_general \(input\)"):
        jquant.convert(qf, qstate, params, x)
    with pytest.warns(UserWarning, match="never ran"):
        qf.apply(qstate, params, x, mode="eval")


@pytest.mark.parametrize("config", [None, presets.int8_dynamic()])
def test_nan_rows_stay_nan_and_other_rows_are_unaffected(config):
    qf, qstate, params, int_fn, int_params = _converted(config, batch=8)
    x = jnp.asarray(RNG.standard_normal((8, 32)), jnp.float32)
    clean = int_fn(int_params, x)
    poisoned = int_fn(int_params, x.at[0, 3].set(jnp.nan))
    assert bool(jnp.all(jnp.isnan(poisoned[0])))
    np.testing.assert_allclose(poisoned[1:], clean[1:], atol=1e-5) if config is None else None
    assert bool(jnp.all(jnp.isfinite(poisoned[1:])))
    expected, _ = qf.apply(qstate, params, x.at[0, 3].set(jnp.nan), mode="eval")
    assert bool(jnp.all(jnp.isnan(expected[0])))


def test_report_is_a_per_site_table_with_totals():
    _, _, _, int_fn, _ = _converted(presets.int8_static(exclude=["l1"]))
    text = str(int_fn.report)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["site", "kernel"]
    assert any(line.startswith("l0/w/dot_general") and "int8 W8A8 dot (static)" in line for line in lines)
    assert lines[-1].startswith("total") and "smaller" in lines[-1]
    # The excluded layer is no quantized site; its weight stays float and the report says so.
    assert any(line.startswith("param l1/w") and "stays float" in line for line in lines)


def test_int4_layers_whose_contraction_the_group_does_not_divide_fall_back_to_int8_with_one_warning():
    params = {"l0": {"w": jnp.asarray(RNG.standard_normal((32, 64)), jnp.float32), "b": jnp.zeros(64)},
              "l1": {"w": jnp.asarray(RNG.standard_normal((64, 16)), jnp.float32), "b": jnp.zeros(16)}}
    x = jnp.asarray(RNG.standard_normal((4, 32)), jnp.float32)
    qf = jquant.quantize(mlp, presets.int4_weight_only(group_size=64))
    with pytest.warns(UserWarning, match=r"1 site\(s\) use their rule's weight_fallback: l0/w/dot_general \(group "
                                         r"size 64 does not divide the contraction size 32"):
        qstate = qf.init(params, x)
    int_fn, int_params = jquant.convert(qf, qstate, params, x)
    rows = {r.site: r for r in int_fn.report.sites}
    assert rows["l0/w/dot_general"].weight_dtype == "int8" and "does not divide" in rows["l0/w/dot_general"].reason
    assert rows["l1/w/dot_general"].weight_dtype == "int4" and rows["l1/w/dot_general"].kind == "weight_only"
    expected, _ = qf.apply(qstate, params, x, mode="eval")
    np.testing.assert_allclose(int_fn(int_params, x), expected, atol=2e-3, rtol=1e-3)


def test_torch_x86_model_converts_every_conv_and_dense_to_int8_kernels():
    """Fused conv+ReLU outputs (observed at the ReLU), a shared max-pool / flatten and dense layers reading
    those already-quantized values all run on int8 kernels; the result equals eval on the output grid."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.max_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), (2, 2))
            return nn.Dense(10)(nn.relu(nn.Dense(32)(y.reshape(y.shape[0], -1))))

    x = jnp.asarray(RNG.standard_normal((16, 8, 8, 3)), jnp.float32)
    model = Net()
    variables = model.init(jax.random.key(1), x)
    qf = jquant.quantize(model.apply, presets.torch_x86())
    qstate = qf.init(variables, x)
    _, qstate = qf.apply(qstate, variables, x, mode="calibrate")
    int_fn, int_params = jquant.convert(qf, qstate, variables, x)
    assert {r.kind for r in int_fn.report.sites} == {"static"}
    expected, _ = qf.apply(qstate, variables, x, mode="eval")
    step = float(qstate["Net/Dense_1/dot_general"]["output"].scale)
    np.testing.assert_allclose(int_fn(int_params, x), expected, atol=step * 1.001)
    assert int_fn(int_params, x[:3]).shape == (3, 10)


def test_float_weights_left_float_are_listed_with_a_reason():
    def embed_mlp(params, ids):
        return mlp(params, params["emb"][ids])

    params = {**_params(), "emb": jnp.asarray(RNG.standard_normal((50, 32)), jnp.float32)}
    ids = jnp.asarray(RNG.integers(0, 50, (8,)), jnp.int32)
    qf = jquant.quantize(embed_mlp, presets.int8_dynamic())
    qstate = qf.init(params, ids)
    int_fn, int_params = jquant.convert(qf, qstate, params, ids)
    rows = {r.site: r for r in int_fn.report.sites}
    assert rows["param emb"].kind == "float" and "gather" in rows["param emb"].reason
    assert "param emb" in str(int_fn.report)
    expected, _ = qf.apply(qstate, params, ids, mode="eval")
    np.testing.assert_allclose(int_fn(int_params, ids), expected, atol=2e-3, rtol=1e-3)
