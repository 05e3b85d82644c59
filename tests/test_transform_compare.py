"""Numeric suite: per-site SQNR of quantized vs float activations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jquant
from jquant.transform import QuantizationSpec, Rule, quantize
from jquant.transform.compare import sqnr_db


def model(p, x):
    h = jax.nn.relu(x @ p["w1"])
    h = lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, p["ws"])[0]
    return h @ p["w2"]


def setup():
    k = jax.random.split(jax.random.key(0), 4)
    p = {"w1": jax.random.normal(k[0], (8, 16)), "ws": jax.random.normal(k[1], (2, 16, 16)) * 0.3,
         "w2": jax.random.normal(k[2], (16, 4))}
    return p, jax.random.normal(k[3], (32, 8))


def test_sqnr_table_rows_and_values():
    p, x = setup()
    int4 = QuantizationSpec("int4", "per_channel_symmetric")
    config = [Rule(pattern="^w2/", weight=int4, inputs=QuantizationSpec("int4")), *jquant.presets.int8_static()]
    qf = quantize(model, config)
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    report = jquant.compare(qf, qstate, p, x)
    sites = [r["site"] for r in report.rows]
    assert sites == ["w1/dot_general", "ws/dot_general[0]", "ws/dot_general[1]", "w2/dot_general"]
    # The first site's SQNR, recomputed from the public API: quantized output of the first layer alone.
    qf1 = quantize(lambda p, x: x @ p["w1"])
    _, qs1 = qf1.apply(qf1.init(p, x), p, x, mode="calibrate")
    expected = sqnr_db(x @ p["w1"], qf1.apply(qs1, p, x, mode="eval")[0])
    assert report.rows[0]["sqnr_db"] == pytest.approx(expected, rel=1e-4)
    assert 25 < report.rows[0]["sqnr_db"] < 60
    assert report.worst(1)[0]["site"] == "w2/dot_general"  # the int4 layer hurts most
    assert "w2/dot_general" in str(report)


def test_sqnr_helper_and_identical_inputs():
    assert sqnr_db(np.ones(4), np.ones(4)) == math.inf
    assert sqnr_db(np.ones(4), np.ones(4) * 1.1) == pytest.approx(20.0)


def test_png_chart(tmp_path):
    pytest.importorskip("matplotlib")
    p, x = setup()
    qf = quantize(model)
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    path = tmp_path / "sqnr.png"
    jquant.compare(qf, qstate, p, x, png_path=str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
