"""jquant.quantize on a plain jnp MLP: exact agreement with hand-written fake quant, modes, jit/grad/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import presets
from jquant.numerics.affine import fake_quantize_affine
from jquant.numerics.qparams import choose_qparams
from jquant.transform import QuantizationSpec, Rule, quantize


def mlp(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def make_params(seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    return {
        "w1": jax.random.normal(k[0], (8, 16)) * 0.5,
        "b1": jax.random.normal(k[1], (16,)) * 0.1,
        "w2": jax.random.normal(k[2], (16, 4)) * 0.5,
        "b2": jax.random.normal(k[3], (4,)) * 0.1,
    }


def batch(seed, n=6):
    return jax.random.normal(jax.random.key(100 + seed), (n, 8))


def act_qparams(values):
    return choose_qparams(jnp.min(values), jnp.max(values), dtype="int8", qscheme="per_tensor_affine")


def weight_fq(w):
    scale, zp = choose_qparams(w.min(axis=0), w.max(axis=0), dtype="int8", qscheme="per_channel_symmetric")
    return fake_quantize_affine(w, scale, zp, dtype="int8", axis=1)


@jax.jit
def reference_eval(p, calib_batches, x):
    """Hand-written static int8 fake quant: min/max over the calibration batches, float activations observed."""
    xs = jnp.concatenate(calib_batches)
    hs = jnp.concatenate([jax.nn.relu(b @ p["w1"] + p["b1"]) for b in calib_batches])
    s1, z1 = act_qparams(xs)
    s2, z2 = act_qparams(hs)
    h = jax.nn.relu(fake_quantize_affine(x, s1, z1) @ weight_fq(p["w1"]) + p["b1"])
    return fake_quantize_affine(h, s2, z2) @ weight_fq(p["w2"]) + p["b2"]


@jax.jit
def reference_on_the_fly(p, x):
    """Qparams from the tensors of this very call, as they arrive (dynamic quant, or one QAT step)."""
    s1, z1 = act_qparams(x)
    h = jax.nn.relu(fake_quantize_affine(x, s1, z1) @ weight_fq(p["w1"]) + p["b1"])
    s2, z2 = act_qparams(h)
    return fake_quantize_affine(h, s2, z2) @ weight_fq(p["w2"]) + p["b2"]


def test_static_int8_matches_hand_written_fake_quant():
    p = make_params()
    qf = quantize(mlp)
    qstate = qf.init(p, batch(0))
    calib = [batch(i) for i in range(3)]
    for b in calib:
        out, qstate = qf.apply(qstate, p, b, mode="calibrate")
        np.testing.assert_array_equal(out, mlp(p, b))  # calibration runs the float function
    x = batch(7)
    out, after = qf.apply(qstate, p, x, mode="eval")
    np.testing.assert_array_equal(out, reference_eval(p, calib, x))
    assert after is qstate
    assert not np.allclose(out, mlp(p, x), atol=1e-4)  # it really is quantized


def test_sites_names_roles_and_qstate_layout():
    p = make_params()
    qf = quantize(mlp)
    qstate = qf.init(p, batch(0))
    names = [s.name for s in qf.sites]
    assert names == ["w1/dot_general", "w2/dot_general"]
    site = qf.sites[0]
    assert site.roles == ("input", "weight") and site.shapes == ((6, 8), (8, 16))
    assert site.operand("weight").out_axes == (1,) and site.operand("weight").param_path == "w1"
    slot = qstate["w1/dot_general"]["weight"]
    assert slot.scale.shape == (16,) and slot.zero_point.dtype == jnp.int32
    assert qstate["w1/dot_general"]["input"].scale.shape == ()


def test_empty_config_is_bitwise_identical_outputs_and_gradients():
    p, x = make_params(), batch(1)
    qf = quantize(mlp, [])
    qstate = qf.init(p, x)
    assert qstate == {}
    for mode in ("calibrate", "qat", "eval"):
        out, _ = qf.apply(qstate, p, x, mode=mode)
        np.testing.assert_array_equal(out, mlp(p, x))

    def loss_q(p, x):
        return jnp.sum(qf.apply(qstate, p, x, mode="qat")[0] ** 2)

    def loss_f(p, x):
        return jnp.sum(mlp(p, x) ** 2)

    gq = jax.jit(jax.grad(loss_q, argnums=(0, 1)))(p, x)
    gf = jax.jit(jax.grad(loss_f, argnums=(0, 1)))(p, x)
    jax.tree_util.tree_map(np.testing.assert_array_equal, gq, gf)


def test_qat_gradients_are_straight_through_fake_quant():
    p, x = make_params(), batch(2)
    qf = quantize(mlp)
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")

    def loss_q(p, x):
        out, _ = qf.apply(qstate, p, x, mode="eval")
        return jnp.sum(out**2)

    def loss_ref(p, x):
        return jnp.sum(reference_eval(p, [x], x) ** 2)

    gq = jax.jit(jax.grad(loss_q, argnums=(0, 1)))(p, x)
    gr = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(p, x)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), gq, gr)
    assert float(jnp.abs(gq[0]["w1"]).sum()) > 0


def test_qat_updates_observers_and_fake_quantizes_with_new_qparams():
    p = make_params()
    qf = quantize(mlp)
    qstate = qf.init(p, batch(0))
    x = batch(3)
    out, new = qf.apply(qstate, p, x, mode="qat")
    # One QAT step from empty observers: each observer sees this batch as it arrives (after earlier fake quant).
    np.testing.assert_array_equal(out, reference_on_the_fly(p, x))
    np.testing.assert_array_equal(new["w1/dot_general"]["input"].observer.min_val, jnp.min(x))


def test_under_jit_and_vmap():
    p = make_params()
    qf = quantize(mlp)
    qstate = qf.init(p, batch(0))
    _, qstate = qf.apply(qstate, p, batch(0), mode="calibrate")
    x = batch(4)
    expected, _ = qf.apply(qstate, p, x, mode="eval")
    jitted = jax.jit(lambda qs, p, x: qf.apply(qs, p, x, mode="eval")[0])
    np.testing.assert_array_equal(jitted(qstate, p, x), expected)
    # vmap over examples: each example is a batch of one row.
    per_example = jax.vmap(lambda row: qf.apply(qstate, p, row[None], mode="eval")[0][0])(x)
    np.testing.assert_allclose(per_example, expected, rtol=1e-6, atol=1e-6)


def test_trace_cache_per_signature():
    p = make_params()
    qf = quantize(mlp)
    qf.init(p, batch(0))
    qf.init(p, batch(1))
    assert len(qf._plans) == 1
    qf.init(p, batch(0, n=3))
    assert len(qf._plans) == 2


def test_weight_only_and_dynamic_presets():
    p, x = make_params(), batch(5)
    qf = quantize(mlp, presets.int8_weight_only())
    qstate = qf.init(p, x)
    out, _ = qf.apply(qstate, p, x, mode="eval")
    ref = jax.nn.relu(x @ weight_fq(p["w1"]) + p["b1"]) @ weight_fq(p["w2"]) + p["b2"]
    # Eval uses the weight qparams stored at init (scale 1): calibrate first.
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    out, _ = qf.apply(qstate, p, x, mode="eval")
    np.testing.assert_array_equal(out, ref)

    qf = quantize(mlp, presets.int8_dynamic())
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")  # sets the weight qparams
    out, _ = qf.apply(qstate, p, x, mode="eval")
    np.testing.assert_array_equal(out, reference_on_the_fly(p, x))


def test_int4_groupwise_weight_only():
    p, x = make_params(), batch(6)
    qf = quantize(mlp, presets.int4_weight_only(group_size=4))
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    assert qstate["w1/dot_general"]["weight"].scale.shape == (16 * 2,)  # 16 columns x 2 groups of 4 rows
    out, _ = qf.apply(qstate, p, x, mode="eval")

    def group_fq(w):  # (K, N): groups of 4 along K, per output column
        k, n = w.shape
        g = w.reshape(k // 4, 4, n)
        scale, zp = choose_qparams(g.min(axis=1), g.max(axis=1), dtype="int4", qscheme="per_channel_symmetric")
        return fake_quantize_affine(w, scale, zp, dtype="int4", block_size=(4, 1))

    ref = jax.nn.relu(x @ group_fq(p["w1"]) + p["b1"]) @ group_fq(p["w2"]) + p["b2"]
    # Same fake-quantized weights; the two programs may fuse the bias add differently (1 ulp on Zen 5).
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_lsq_qparams_are_learnable():
    from jquant.transform import learnable_params, merge_learnable

    p, x = make_params(), batch(2)
    qf = quantize(mlp, presets.qat_int8(lsq=True))
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    learn = learnable_params(qstate)
    assert set(learn) == {"w1/dot_general", "w2/dot_general"}
    assert set(learn["w1/dot_general"]) == {"input", "weight"}

    def loss(params, learn):
        out, _ = qf.apply(merge_learnable(qstate, learn), params, x, mode="qat")
        return jnp.sum(out**2)

    g_params, g_learn = jax.grad(loss, argnums=(0, 1))(p, learn)
    assert float(jnp.abs(g_learn["w1/dot_general"]["input"].scale)) > 0
    assert float(jnp.abs(g_learn["w2/dot_general"]["weight"].scale).sum()) > 0
    assert float(jnp.abs(g_params["w1"]).sum()) > 0
    _, after_qat = qf.apply(qstate, p, x * 3, mode="qat")
    # QAT leaves the LSQ qparams to training.
    jax.tree_util.tree_map(np.testing.assert_array_equal, learnable_params(after_qat), learnable_params(qstate))
    old_max = float(qstate["w1/dot_general"]["input"].observer.max_val)
    new_max = float(after_qat["w1/dot_general"]["input"].observer.max_val)
    assert new_max == pytest.approx(old_max + 0.01 * (float((x * 3).max()) - old_max))  # moving average observer
    # LSQ forward equals the STE fake quant with the same (integer-valued) qparams.
    out_lsq, _ = qf.apply(qstate, p, x, mode="eval")
    np.testing.assert_allclose(out_lsq, reference_eval(p, [x], x), rtol=1e-6, atol=1e-6)


def test_fp8_preset_runs_and_changes_values():
    p, x = make_params(), batch(2)
    qf = quantize(mlp, presets.fp8())
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    out, _ = qf.apply(qstate, p, x, mode="eval")
    ref = mlp(p, x)
    assert 0 < float(jnp.abs(out - ref).max()) < 0.1 * float(jnp.abs(ref).max())


def test_exported_from_package():
    assert jquant.quantize is quantize
    assert jquant.QuantizationSpec is QuantizationSpec and jquant.Rule is Rule


@pytest.mark.parametrize("mode", ["train", None, "EVAL"])
def test_bad_mode(mode):
    p, x = make_params(), batch(0)
    qf = quantize(mlp)
    qstate = qf.init(p, x)
    with pytest.raises(ValueError, match="mode"):
        qf.apply(qstate, p, x, mode=mode)


@pytest.mark.parametrize("mode", ["calibrate", "qat", "eval"])
def test_empty_batch_gives_the_empty_output_and_leaves_observers_unchanged(mode):
    p, x = make_params(), batch(6)
    qf = quantize(mlp)
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    empty = jnp.zeros((0, x.shape[1]), jnp.float32)
    out, new = qf.apply(qstate, p, empty, mode=mode)
    assert out.shape == (0, mlp(p, x).shape[1])
    jax.tree_util.tree_map(np.testing.assert_array_equal, new, qstate)
