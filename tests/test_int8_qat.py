"""QAT fast path: int8 forward, straight-through f32 backward; same numerics and training as fake-quant QAT."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jquant
from jquant import presets
from jquant.numerics.affine import fake_quantize_affine
from jquant.transform.int8_qat import qat_int8_matmul

RNG = np.random.default_rng(0)


def mlp(params, x):
    h = jax.nn.relu(x @ params["l0"]["w"] + params["l0"]["b"])
    return h @ params["l1"]["w"] + params["l1"]["b"]


def _params(n_in=64, hidden=32, n_out=10, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "l0": {"w": jnp.asarray(rng.standard_normal((n_in, hidden)) / np.sqrt(n_in), jnp.float32),
               "b": jnp.zeros(hidden, jnp.float32)},
        "l1": {"w": jnp.asarray(rng.standard_normal((hidden, n_out)) / np.sqrt(hidden), jnp.float32),
               "b": jnp.zeros(n_out, jnp.float32)},
    }


def test_qat_int8_matmul_values_and_gradients_equal_fake_quant():
    x = jnp.asarray(RNG.standard_normal((5, 48)) * 2, jnp.float32)  # some values clip: the masks matter
    w = jnp.asarray(RNG.standard_normal((48, 12)), jnp.float32)
    xs, xz = jnp.float32(0.02), jnp.int32(-3)
    ws = jnp.asarray(RNG.uniform(0.005, 0.02, 12), jnp.float32)

    def reference(x, w):
        fx = fake_quantize_affine(x, xs, xz, dtype="int8")
        fw = fake_quantize_affine(w, ws, jnp.zeros(12, jnp.int32), dtype="int8", axis=1)
        return jnp.sum(jnp.sin(fx @ fw))

    def fast(x, w):
        return jnp.sum(jnp.sin(qat_int8_matmul(x, w, xs, xz, ws, jnp.int32(0), (-128, 127), (-128, 127))))

    v_ref, g_ref = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(x, w)
    v_fast, g_fast = jax.jit(jax.value_and_grad(fast, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(v_fast, v_ref, rtol=1e-5)
    for a, b in zip(g_fast, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert float(jnp.mean(g_ref[0] == 0)) > 0.05  # clipped activations really get zero gradient

    def fast8(x, w):
        y = qat_int8_matmul(x, w, xs, xz, ws, jnp.int32(0), (-128, 127), (-128, 127), True)
        return jnp.sum(jnp.sin(y))

    g8 = jax.jit(jax.grad(fast8, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(g8[1], g_ref[1], rtol=1e-4, atol=1e-5)  # dw stays float
    rel = float(jnp.linalg.norm(g8[0] - g_ref[0]) / jnp.linalg.norm(g_ref[0]))
    assert 0 < rel < 0.01  # dx through the int8 dot: small gradient rounding noise only


@pytest.mark.parametrize("act_dtype", ["int8", "uint8"])
def test_qat_apply_matches_transform_qat_mode(act_dtype):
    params, x = _params(), jnp.asarray(RNG.standard_normal((8, 64)), jnp.float32)
    qf = jquant.quantize(mlp, presets.qat_int8(activation_dtype=act_dtype))
    qstate = qf.init(params, x)
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")

    def loss(apply, p):
        out, new_qstate = apply(p)
        return jnp.sum(out**2), new_qstate

    ref = jax.jit(jax.value_and_grad(lambda p: loss(lambda q: qf.apply(qstate, q, x, mode="qat"), p), has_aux=True))
    def fast_apply(q):
        return qf.apply(qstate, q, x, mode="qat", int8_forward=True)

    fast = jax.jit(jax.value_and_grad(lambda p: loss(fast_apply, p), has_aux=True))
    (l_ref, qs_ref), g_ref = ref(params)
    (l_fast, qs_fast), g_fast = fast(params)
    np.testing.assert_allclose(l_fast, l_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(qs_fast), jax.tree.leaves(qs_ref), strict=True):
        np.testing.assert_array_equal(a, b)  # observers updated exactly as in qat mode
    lowered = jax.jit(lambda p: qf.apply(qstate, p, x, mode="qat", int8_forward=True)[0]).lower(params).as_text()
    assert "xi8>" in lowered and "xi32>" in lowered  # the forward really runs int8 x int8 -> int32
    # the same fast path through the transform's own API
    via_apply, qs_apply = qf.apply(qstate, params, x, mode="qat", int8_forward=True)
    np.testing.assert_array_equal(via_apply, qf.apply(qstate, params, x, mode="qat", int8_forward=True)[0])
    for a, b in zip(jax.tree.leaves(qs_apply), jax.tree.leaves(qs_ref), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="int8_forward: only applies to mode='qat'"):
        qf.apply(qstate, params, x, mode="eval", int8_forward=True)


def test_ineligible_sites_fall_back_to_fake_quant():
    params, x = _params(), jnp.asarray(RNG.standard_normal((4, 64)), jnp.float32)
    qf = jquant.quantize(mlp, presets.qat_int8(lsq=True))  # LSQ is not on the fast path
    qstate = qf.init(params, x)
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")
    expected, _ = qf.apply(qstate, params, x, mode="qat")
    got, _ = jax.jit(lambda p: qf.apply(qstate, p, x, mode="qat", int8_forward=True))(params)
    np.testing.assert_array_equal(got, expected)


def test_training_with_fast_path_matches_fake_quant_training():
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = jnp.asarray(digits.data / 16.0, jnp.float32)
    labels = jnp.asarray(digits.target)
    x_train, y_train, x_test, y_test = data[:1400], labels[:1400], data[1400:], labels[1400:]
    params = _params()
    qf = jquant.quantize(mlp, presets.qat_int8())
    qstate0 = qf.init(params, x_train[:128])
    _, qstate0 = qf.apply(qstate0, params, x_train[:256], mode="calibrate")
    opt = optax.adam(3e-3)

    def train(apply):
        @jax.jit
        def step(p, opt_state, qstate, xb, yb):
            def loss_fn(q):
                logits, new_qstate = apply(qstate, q, xb)
                return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), new_qstate

            (loss, new_qstate), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
            updates, opt_state = opt.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, new_qstate, loss

        p, opt_state, qstate = params, opt.init(params), qstate0
        for _ in range(10):
            for i in range(0, 1400, 100):
                p, opt_state, qstate, loss = step(p, opt_state, qstate, x_train[i:i + 100], y_train[i:i + 100])
        logits, _ = qf.apply(qstate, p, x_test, mode="eval")
        return float(jnp.mean(jnp.argmax(logits, -1) == y_test)), float(loss), p

    acc_fq, loss_fq, p_fq = train(lambda qs, p, xb: qf.apply(qs, p, xb, mode="qat"))
    acc_fast, loss_fast, p_fast = train(lambda qs, p, xb: qf.apply(qs, p, xb, mode="qat", int8_forward=True))
    assert acc_fq > 0.85 and acc_fast > 0.85
    assert abs(acc_fast - acc_fq) < 0.03 and abs(loss_fast - loss_fq) < 0.05
    drift = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p_fast), jax.tree.leaves(p_fq),
                                                                strict=True))
    assert drift < 0.05  # same numerics: the two runs only differ by float rounding of the rescale


def test_fallback_site_updates_observers_once_like_plain_qat():
    """A per-channel weight axis that is contracted cannot run the int8 path: the site falls back to fake
    quant and its observers must see each tensor exactly once (moving-average ranges equal plain QAT's)."""
    weight = jquant.QuantizationSpec("int8", "per_channel_symmetric", ch_axis=0)  # axis 0 of (K, N) is contracted
    act = jquant.QuantizationSpec("int8", "per_tensor_affine", observer="moving_average")
    qf = jquant.quantize(lambda p, x: x @ p["w"], jquant.Rule(weight=weight, inputs=act))
    params = {"w": jnp.asarray(RNG.standard_normal((16, 8)), jnp.float32)}
    x0 = jnp.asarray(RNG.standard_normal((4, 16)), jnp.float32)
    x1 = jnp.asarray(RNG.standard_normal((4, 16)) * 3, jnp.float32)
    qstate = qf.init(params, x0)
    _, plain = qf.apply(qstate, params, x0, mode="qat")
    _, plain = qf.apply(plain, params, x1, mode="qat")
    _, fast = qf.apply(qstate, params, x0, mode="qat", int8_forward=True)
    _, fast = qf.apply(fast, params, x1, mode="qat", int8_forward=True)
    name = "w/dot_general"
    for key in ("input", "weight"):
        np.testing.assert_array_equal(fast[name][key].observer.min_val, plain[name][key].observer.min_val)
        np.testing.assert_array_equal(fast[name][key].observer.max_val, plain[name][key].observer.max_val)
