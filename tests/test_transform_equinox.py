"""equinox models quantize without edits: split params from static structure, quantize the pure function."""

import equinox as eqx
import jax
import numpy as np

import jquant


def test_equinox_mlp_quantizes_and_matches_hand_written_fake_quant():
    model = eqx.nn.MLP(in_size=8, out_size=3, width_size=16, depth=1, key=jax.random.PRNGKey(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def fn(params, x):
        return jax.vmap(eqx.combine(params, static))(x)

    x = jax.random.normal(jax.random.PRNGKey(1), (32, 8))
    qf = jquant.quantize(fn, jquant.presets.int8_weight_only())
    qstate = qf.init(params, x)
    names = [site.name for site in qf.sites]
    assert names == ["layers/0/weight/dot_general", "layers/1/weight/dot_general"]  # named by parameter path
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")
    out, _ = qf.apply(qstate, params, x, mode="eval")

    def hand_written(x):
        h = x
        for i, layer in enumerate(model.layers):
            w = layer.weight  # (out, in): one scale per output row
            scale, zp = jquant.choose_qparams(w.min(1), w.max(1), dtype="qint8", qscheme="per_channel_symmetric")
            wq = jquant.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)
            h = h @ wq.T + layer.bias
            if i < len(model.layers) - 1:
                h = jax.nn.relu(h)
        return h

    np.testing.assert_allclose(np.asarray(out), np.asarray(hand_written(x)), rtol=1e-5, atol=1e-6)
    float_out, _ = jquant.quantize(fn, []).apply({}, params, x, mode="eval")
    assert np.array_equal(np.asarray(float_out), np.asarray(jax.jit(fn)(params, x)))
