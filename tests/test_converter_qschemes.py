"""jquant.convert for every weight qscheme (per-tensor affine, uint8 / uint4, float qparams) and for embedding
gathers (weight-only, per-row qparams): integer params, output equal to eval, torch's quantized Embedding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantizationSpec, Rule, load_int_params, presets, save_int_params
from jquant.kernels import QuantizedWeight
from jquant.kernels.embedding import quantized_gather
from jquant.kernels.weights import quantize_weight
from jquant.numerics.affine import fake_quantize_affine

RNG = np.random.default_rng(11)
UINT8 = QuantizationSpec("uint8")
FLOAT_QPARAMS = QuantizationSpec("uint8", "per_channel_affine_float_qparams")


def _calibrated(fn, config, *args):
    qf = jquant.quantize(fn, config)
    qstate = qf.init(*args)
    _, qstate = qf.apply(qstate, *args, mode="calibrate")
    return qf, qstate


def _weights(int_params):
    return [leaf for leaf in jax.tree.leaves(int_params["sites"], is_leaf=lambda v: isinstance(v, QuantizedWeight))
            if isinstance(leaf, QuantizedWeight)]


DOT_SCHEMES = {
    "int8_per_tensor_affine_static": (QuantizationSpec("int8", "per_tensor_affine"), UINT8, "static"),
    "int8_per_tensor_affine_weight_only": (QuantizationSpec("int8", "per_tensor_affine"), None, "weight_only"),
    "uint8_float_qparams_weight_only": (FLOAT_QPARAMS, None, "weight_only"),
    "uint8_float_qparams_static": (FLOAT_QPARAMS, UINT8, "dequantize"),
    "uint4_per_channel_affine_g32": (QuantizationSpec("uint4", "per_channel_affine", block_size=32), None,
                                     "weight_only"),
    "int4_per_channel_affine_g32": (QuantizationSpec("int4", "per_channel_affine", block_size=32), None,
                                    "weight_only"),
    "uint8_per_channel_affine_static": (QuantizationSpec("uint8", "per_channel_affine"), UINT8, "static"),
    "uint8_per_tensor_affine_dynamic": (QuantizationSpec("uint8", "per_tensor_affine"),
                                        QuantizationSpec("uint8", is_dynamic=True), "dynamic"),
    "uint8_per_channel_symmetric_static": (QuantizationSpec("uint8", "per_channel_symmetric"), UINT8, "static"),
    "uint4_per_tensor_symmetric_weight_only": (QuantizationSpec("uint4", "per_tensor_symmetric"), None,
                                               "weight_only"),
}


@pytest.mark.parametrize("name", list(DOT_SCHEMES))
def test_dot_weight_qschemes_convert_to_integers(name):
    wspec, act, kind = DOT_SCHEMES[name]
    params = {"w": jnp.asarray(RNG.standard_normal((64, 8)) + 0.3, jnp.float32)}
    x = jnp.asarray(RNG.standard_normal((16, 64)), jnp.float32)
    qf, qstate = _calibrated(lambda p, x: x @ p["w"], [Rule(weight=wspec, inputs=act)], params, x)
    expected, _ = qf.apply(qstate, params, x, mode="eval")
    int_fn, int_params = jquant.convert(qf, qstate, params, x)
    row = int_fn.report.sites[0]
    assert row.kind == kind, int_fn.report
    assert row.weight_dtype == wspec.dtype
    assert row.bytes_after < row.bytes_before and int_fn.report.int_bytes < int_fn.report.float_bytes
    assert int_params["params"]["w"] is None
    (qw,) = _weights(int_params)
    assert qw.int_values().dtype == jnp.int8 and qw.dtype == ("int4" if "4" in wspec.dtype else "int8")
    np.testing.assert_allclose(int_fn(int_params, x), expected, rtol=1e-5, atol=2e-5)
    if act is None:  # weight-only: also the exact dequantize path
        int_fn, int_params = jquant.convert(qf, qstate, params, x, weight_only_impl="dequantize")
        np.testing.assert_allclose(int_fn(int_params, x), expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dtype,qscheme", [("uint8", "per_channel_affine"), ("uint4", "per_channel_affine"),
                                           ("uint8", "per_channel_affine_float_qparams"),
                                           ("uint4", "per_channel_affine_float_qparams"),
                                           ("uint8", "per_channel_symmetric")])
def test_unsigned_weights_stored_signed_dequantize_like_fake_quant(dtype, qscheme):
    """uint values are stored as q - 2^(b-1) (exact); dequantize() equals the fake-quant weight bit for bit."""
    from jquant.numerics.qparams import choose_qparams

    w = jnp.asarray(RNG.standard_normal((12, 32)) * 0.5 + 0.2, jnp.float32)
    w = w.at[3].set(jnp.abs(w[3]) + 1.0)  # an all-positive row: zero point outside the range for float qparams
    scale, zp = choose_qparams(w.min(axis=1), w.max(axis=1), dtype=dtype, qscheme=qscheme)
    symmetric = qscheme == "per_channel_symmetric"
    qw = quantize_weight(w, dtype=dtype, axis=0, symmetric=symmetric, scale=scale,
                         zero_point=None if symmetric else zp)
    expected = fake_quantize_affine(w, scale, zp, dtype=dtype, axis=0)
    np.testing.assert_array_equal(qw.dequantize(), expected)
    bits = 8 if dtype == "uint8" else 4
    values = np.asarray(qw.int_values())
    assert values.dtype == np.int8 and values.min() >= -(2 ** (bits - 1)) and values.max() < 2 ** (bits - 1)
    if "float" in qscheme:
        assert qw.zero_point is None and qw.float_zero_point.dtype == jnp.float32
        assert qw.value_offset == 2 ** (bits - 1)
    elif symmetric:
        assert qw.zero_point is None  # torch's uint8 symmetric zero point 128 is 0 once shifted
    else:
        np.testing.assert_array_equal(np.asarray(qw.zero_point).ravel(), np.asarray(zp) - 2 ** (bits - 1))


def test_conv_weight_qschemes():
    """uint8 symmetric conv weights run the integer conv; asymmetric ones are stored as integers, dequantized."""
    x = jnp.asarray(RNG.standard_normal((2, 8, 8, 16)), jnp.float32)
    params = {"k": jnp.asarray(RNG.standard_normal((3, 3, 16, 32)) / 12, jnp.float32)}

    def conv(p, x):
        return jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    for wspec, kind in [(QuantizationSpec("uint8", "per_channel_symmetric"), "static"),
                        (QuantizationSpec("int8", "per_tensor_affine"), "dequantize"),
                        (QuantizationSpec("uint8", "per_channel_affine"), "dequantize")]:
        qf, qstate = _calibrated(conv, [Rule(weight=wspec, inputs=UINT8)], params, x)
        expected, _ = qf.apply(qstate, params, x, mode="eval")
        int_fn, int_params = jquant.convert(qf, qstate, params, x)
        row = int_fn.report.sites[0]
        assert row.kind == kind and row.bytes_after < row.bytes_before, int_fn.report
        assert int_params["params"]["k"] is None
        np.testing.assert_allclose(int_fn(int_params, x), expected, rtol=1e-5, atol=1e-4)


# -- embeddings ----------------------------------------------------------------------------------------------

TABLE_SPECS = {
    "uint8_float_qparams": FLOAT_QPARAMS,
    "uint4_float_qparams": QuantizationSpec("uint4", "per_channel_affine_float_qparams"),
    "int8_per_row": QuantizationSpec("int8", "per_channel_symmetric"),
    "int4_per_row": QuantizationSpec("int4", "per_channel_symmetric"),
    "uint8_per_row_affine": QuantizationSpec("uint8", "per_channel_affine"),
    "uint8_per_tensor": QuantizationSpec("uint8", "per_tensor_affine"),
}
LOOKUPS = {
    "index": lambda p, ids: p["emb"][ids],
    "take_fill_nan": lambda p, ids: jnp.take(p["emb"], ids, axis=0),
    "take_fill_zero": lambda p, ids: jnp.take(p["emb"], ids, axis=0, mode="fill", fill_value=0.0),
    "take_clip": lambda p, ids: jnp.take(p["emb"], ids, axis=0, mode="clip"),
    "take_columns": lambda p, ids: jnp.take(p["emb"], ids % 16, axis=1),
}


@pytest.mark.parametrize("spec_name", list(TABLE_SPECS))
@pytest.mark.parametrize("lookup", list(LOOKUPS))
def test_embedding_gather_converts_weight_only(spec_name, lookup):
    spec = TABLE_SPECS[spec_name]
    params = {"emb": jnp.asarray(RNG.standard_normal((40, 16)), jnp.float32)}
    params["emb"] = params["emb"].at[5].add(3.0)  # an all-positive row
    ids = jnp.asarray(RNG.integers(-4, 44, (3, 9)), jnp.int32)  # out of bounds too (fill / clip / wrap)
    qf, qstate = _calibrated(LOOKUPS[lookup], [Rule(primitives=("gather",), weight=spec)], params, ids)
    (site,) = qf.plan(params, ids).quantized_sites
    if spec.per_channel:  # per row of the table (the indexed axis: an embedding vector), like torch
        assert site.operands[0].out_axes == ((1,) if lookup == "take_columns" else (0,))
    expected, _ = qf.apply(qstate, params, ids, mode="eval")
    int_fn, int_params = jquant.convert(qf, qstate, params, ids)
    row = int_fn.report.sites[0]
    assert (row.kind, row.kernel) == ("weight_only", "embedding gather (dequantize rows)"), int_fn.report
    assert row.bytes_after < row.bytes_before and int_fn.report.int_bytes < int_fn.report.float_bytes
    assert int_params["params"]["emb"] is None
    got = int_fn(int_params, ids)
    np.testing.assert_array_equal(got, expected)  # bit for bit, NaN fill included
    other = jnp.asarray(RNG.integers(0, 40, (5,)), jnp.int32)  # another batch shape
    np.testing.assert_array_equal(int_fn(int_params, other), qf.apply(qstate, params, other, mode="eval")[0])


def test_quantized_gather_int4_window_and_bf16():
    """Row windows (slice size > 1 along the indexed axis), packed int4 and a bf16 result."""
    table = jnp.asarray(RNG.standard_normal((20, 8)), jnp.float32)
    qw = quantize_weight(table, dtype="int4", axis=0, symmetric=True)
    idx = jnp.asarray([[0], [7], [18]], jnp.int32)
    dn = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2), collapsed_slice_dims=(), start_index_map=(0,))
    kw = dict(dimension_numbers=dn, slice_sizes=(3, 8), mode=jax.lax.GatherScatterMode.CLIP)
    expected = jax.lax.gather(qw.dequantize(jnp.bfloat16), idx, **kw)
    got = quantized_gather(qw, idx, **kw, dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, expected)


class EmbedDense(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(64, 32)(ids)
        return h, nn.Dense(8)(h)


def _embed_model():
    model = EmbedDense()
    ids = jnp.asarray(RNG.integers(0, 64, (4, 6)), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), ids)
    return model, variables, ids


@pytest.mark.parametrize("spec", [FLOAT_QPARAMS, QuantizationSpec("int8", "per_channel_symmetric")],
                         ids=["uint8_float_qparams", "int8_per_row"])
def test_flax_embed_dense_converts_and_round_trips(spec, tmp_path):
    model, variables, ids = _embed_model()
    config = [Rule(primitives=("gather",), weight=spec), *presets.int8_weight_only()]  # the docstring example
    qf, qstate = _calibrated(model.apply, config, variables, ids)
    (emb_expected, expected), _ = qf.apply(qstate, variables, ids, mode="eval")
    int_fn, int_params = jquant.convert(qf, qstate, variables, ids)
    kinds = int_fn.report.site_kinds
    assert sorted(kinds.values()) == ["weight_only", "weight_only"], int_fn.report
    assert int_params["params"]["params"]["Embed_0"]["embedding"] is None
    assert int_fn.report.int_bytes < int_fn.report.float_bytes / 2
    emb, out = int_fn(int_params, ids)
    np.testing.assert_array_equal(emb, emb_expected)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)

    path = tmp_path / "embed.safetensors"
    save_int_params(path, int_params)
    loaded = load_int_params(path)
    for a, b in zip(_weights(int_params), _weights(loaded), strict=True):
        assert (a.float_zero_point is None) == (b.float_zero_point is None) and a.value_offset == b.value_offset
        np.testing.assert_array_equal(a.dequantize(), b.dequantize())
    emb2, out2 = int_fn(loaded, ids)
    np.testing.assert_array_equal(emb2, emb)
    np.testing.assert_array_equal(out2, out)


def test_weight_only_presets_do_not_quantize_gathers():
    model, variables, ids = _embed_model()
    for config in (presets.int8_weight_only(), presets.int4_weight_only(16)):
        qf, qstate = _calibrated(model.apply, config, variables, ids)
        assert [s.primitive for s in qf.plan(variables, ids).quantized_sites] == ["dot_general"]
        int_fn, int_params = jquant.convert(qf, qstate, variables, ids)
        assert int_params["params"]["params"]["Embed_0"]["embedding"] is not None
        reasons = {r.site: r.reason for r in int_fn.report.sites}
        assert "gather Rule" in reasons["param params/Embed_0/embedding"]


def test_float_qparams_embedding_matches_torch():
    """torch's quantized Embedding (float_qparams_weight_only_qconfig: per-row uint8, float zero points)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 24)
    with torch.no_grad():
        emb.weight[3] = 2.0 + torch.rand(24)  # all positive: the zero point lies outside [0, 255]
        emb.weight[4] = -1.0 - torch.rand(24)
    emb.qconfig = torch.ao.quantization.float_qparams_weight_only_qconfig
    qemb = torch.ao.nn.quantized.Embedding.from_float(emb)  # kept alive: weight() views its packed params
    qweight = qemb.weight()
    table = emb.weight.detach().numpy()
    ids = np.asarray(RNG.integers(0, 100, (5, 30)), np.int32)

    params = {"emb": jnp.asarray(table)}
    qf, qstate = _calibrated(lambda p, i: p["emb"][i], [Rule(primitives=("gather",), weight=FLOAT_QPARAMS)],
                             params, jnp.arange(100, dtype=jnp.int32))
    int_fn, int_params = jquant.convert(qf, qstate, params, jnp.asarray(ids))
    qw = int_params["sites"]["emb/gather"].weight
    scales = np.asarray(qweight.q_per_channel_scales().tolist(), np.float32)
    zero_points = np.asarray(qweight.q_per_channel_zero_points().tolist(), np.float32)
    np.testing.assert_array_equal(np.asarray(qw.scale).ravel(), scales)
    np.testing.assert_array_equal(np.asarray(qw.float_zero_point).ravel(), zero_points)
    np.testing.assert_array_equal(np.asarray(qw.int_values()).astype(np.int32) + qw.value_offset,
                                  qweight.int_repr().numpy().astype(np.int32))
    got = np.asarray(int_fn(int_params, jnp.asarray(ids)))
    # jquant's rows are torch's float-qparams fake quant exactly ((q - zp) * scale rounded once) ...
    fake = torch.fake_quantize_per_channel_affine(emb.weight.detach(), torch.from_numpy(scales),
                                                  torch.from_numpy(zero_points), 0, 0, 255).numpy()
    np.testing.assert_array_equal(got, fake[ids])
    # ... and torch's quantized-tensor dequantize ((q - zp) rounded, then * scale) within one float rounding.
    np.testing.assert_array_max_ulp(got, qweight.dequantize().numpy()[ids], maxulp=1)
