"""jquant.quantize through control flow: scan, cond, while_loop, fori_loop, checkpoint, custom_jvp / custom_vjp."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.numerics.affine import fake_quantize_affine
from jquant.numerics.qparams import choose_qparams
from jquant.transform import quantize


def fq_act(x, lo, hi):
    s, z = choose_qparams(jnp.float32(lo), jnp.float32(hi), dtype="int8", qscheme="per_tensor_affine")
    return fake_quantize_affine(x, s, z)


def fq_weight(w):
    s, z = choose_qparams(w.min(axis=0), w.max(axis=0), dtype="int8", qscheme="per_channel_symmetric")
    return fake_quantize_affine(w, s, z, dtype="int8", axis=1)


def params(n=6, seed=0):
    keys = jax.random.split(jax.random.key(seed), n + 2)
    p = {name: jax.random.normal(k, (4, 4)) * 0.7 for name, k in zip("abcdef"[:n], keys, strict=False)}
    p["ws"] = jax.random.normal(keys[-2], (3, 4, 4)) * 0.7
    return p, jax.random.normal(keys[-1], (5, 4))


def test_lax_scan_over_stacked_weights_per_iteration_stats():
    p, x = params()

    def fn(p, x):
        return lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["ws"])[0]

    qf = quantize(fn)
    qstate = qf.init(p, x)
    (site,) = qf.sites
    assert site.name == "ws/dot_general" and site.stack == (3,)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    out, _ = qf.apply(qstate, p, x, mode="eval")
    h, ref, mins = x, x, []
    for i in range(3):
        mins.append(float(h.min()))
        ref = jnp.tanh(fq_act(ref, h.min(), h.max()) @ fq_weight(p["ws"][i]))
        h = jnp.tanh(h @ p["ws"][i])
    np.testing.assert_allclose(qstate[site.name]["input"].observer.min_val, mins, rtol=1e-6)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_cond_interprets_every_branch_and_threads_states():
    p, x = params()

    def fn(p, x, flag):
        return lax.cond(flag > 0, lambda h: h @ p["a"], lambda h: (h * 2) @ p["b"], x)

    qf = quantize(fn)
    qstate = qf.init(p, x, 1.0)
    assert sorted(s.name for s in qf.sites) == ["a/dot_general", "b/dot_general"]
    _, qstate = qf.apply(qstate, p, x, 1.0, mode="calibrate")
    assert np.isinf(qstate["b/dot_general"]["input"].observer.min_val)  # branch not taken: nothing observed
    np.testing.assert_allclose(qstate["a/dot_general"]["input"].observer.min_val, x.min())
    _, qstate = qf.apply(qstate, p, x, -1.0, mode="calibrate")
    np.testing.assert_allclose(qstate["b/dot_general"]["input"].observer.max_val, 2 * x.max())
    out, _ = qf.apply(qstate, p, x, -1.0, mode="eval")
    np.testing.assert_allclose(out, fq_act(x * 2, 2 * x.min(), 2 * x.max()) @ fq_weight(p["b"]), rtol=1e-6)


def test_while_loop_merges_statistics_over_iterations():
    p, x = params()

    def fn(p, x):
        return lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["c"])), (0, x))[1]

    qf = quantize(fn)
    qstate = qf.init(p, x)
    (site,) = qf.sites
    assert site.in_while and site.stack == ()
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    hs = [x]
    for _ in range(2):
        hs.append(jnp.tanh(hs[-1] @ p["c"]))
    lo, hi = min(float(h.min()) for h in hs), max(float(h.max()) for h in hs)
    np.testing.assert_allclose(qstate[site.name]["input"].observer.min_val, lo, rtol=1e-6)
    np.testing.assert_allclose(qstate[site.name]["input"].observer.max_val, hi, rtol=1e-6)


def test_fori_loop_and_checkpoint_with_gradients():
    p, x = params()

    def fn(p, x):
        h = lax.fori_loop(0, 2, lambda i, h: jnp.tanh(h @ p["d"]), x)  # static bounds: a scan
        return jax.checkpoint(lambda h: jax.nn.gelu(h @ p["e"]))(h)

    qf = quantize(fn)
    qstate = qf.init(p, x)
    assert [s.stack for s in qf.sites] == [(2,), ()]
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    h1 = jnp.tanh(x @ p["d"])
    h2 = jnp.tanh(h1 @ p["d"])

    def ref(p, x):
        r = jnp.tanh(fq_act(x, x.min(), x.max()) @ fq_weight(p["d"]))
        r = jnp.tanh(fq_act(r, h1.min(), h1.max()) @ fq_weight(p["d"]))
        return jax.nn.gelu(fq_act(r, h2.min(), h2.max()) @ fq_weight(p["e"]))

    out, _ = qf.apply(qstate, p, x, mode="eval")
    np.testing.assert_allclose(out, ref(p, x), rtol=1e-5, atol=1e-6)
    g = jax.jit(jax.grad(lambda p, x: qf.apply(qstate, p, x, mode="eval")[0].sum(), argnums=(0, 1)))(p, x)
    g_ref = jax.jit(jax.grad(lambda p, x: ref(p, x).sum(), argnums=(0, 1)))(p, x)
    np.testing.assert_allclose(g[0]["e"], g_ref[0]["e"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-4, atol=1e-5)


def test_custom_jvp_activations_relu_gelu_silu():
    p, x = params()

    def fn(p, x):
        h = jax.nn.relu(x @ p["a"])
        h = jax.nn.gelu(h @ p["b"], approximate=False)
        return jax.nn.silu(h @ p["c"])

    qf = quantize(fn)
    qstate = qf.init(p, x)
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    h1 = jax.nn.relu(x @ p["a"])
    h2 = jax.nn.gelu(h1 @ p["b"], approximate=False)

    def ref(p, x):
        r = jax.nn.relu(fq_act(x, x.min(), x.max()) @ fq_weight(p["a"]))
        r = jax.nn.gelu(fq_act(r, h1.min(), h1.max()) @ fq_weight(p["b"]), approximate=False)
        return jax.nn.silu(fq_act(r, h2.min(), h2.max()) @ fq_weight(p["c"]))

    out, _ = qf.apply(qstate, p, x, mode="eval")
    np.testing.assert_allclose(out, jax.jit(ref)(p, x), rtol=1e-5, atol=1e-6)
    g = jax.jit(jax.grad(lambda x: qf.apply(qstate, p, x, mode="eval")[0].sum()))(x)
    np.testing.assert_allclose(g, jax.jit(jax.grad(lambda x: ref(p, x).sum()))(x), rtol=1e-4, atol=1e-5)


def test_sites_inside_custom_jvp_and_custom_vjp_keep_their_derivative():
    p, x = params()

    @jax.custom_jvp
    def scaled_matmul(h, w):
        return h @ w

    scaled_matmul.defjvp(lambda primals, tangents: (
        scaled_matmul(*primals), 3.0 * (tangents[0] @ primals[1] + primals[0] @ tangents[1])))

    @jax.custom_vjp
    def clipped_matmul(h, w):
        return h @ w

    clipped_matmul.defvjp(
        lambda h, w: (h @ w, (h, w)), lambda res, g: (jnp.clip(g @ res[1].T, -0.1, 0.1), res[0].T @ g)
    )

    for wrapped, expected_dx in [
        (scaled_matmul, lambda w: 3.0 * jnp.broadcast_to(w.sum(axis=1), x.shape)),
        (clipped_matmul, lambda w: jnp.clip(jnp.broadcast_to(w.sum(axis=1), x.shape), -0.1, 0.1)),
    ]:
        qf = quantize(lambda p, x, f=wrapped: f(x, p["a"]))
        qstate = qf.init(p, x)
        (site,) = qf.sites
        assert site.name == "a/dot_general"
        _, qstate = qf.apply(qstate, p, x, mode="calibrate")
        out, _ = qf.apply(qstate, p, x, mode="eval")
        np.testing.assert_allclose(out, fq_act(x, x.min(), x.max()) @ fq_weight(p["a"]), rtol=1e-6)
        dx = jax.grad(lambda x, qf=qf, qs=qstate: qf.apply(qs, p, x, mode="eval")[0].sum())(x)
        np.testing.assert_allclose(dx, expected_dx(p["a"]), rtol=1e-6)
