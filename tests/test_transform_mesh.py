"""jquant.quantize on an 8-device CPU mesh (run in a subprocess so XLA_FLAGS applies before jax starts)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jquant.transform import quantize

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    k = jax.random.split(jax.random.key(0), 3)
    p = {"w1": jax.random.normal(k[0], (8, 16)), "w2": jax.random.normal(k[1], (16, 4))}
    x = jax.random.normal(k[2], (32, 8)) * jnp.arange(1, 33)[:, None]  # shards see different ranges

    def mlp(p, x):
        return jax.nn.relu(x @ p["w1"]) @ p["w2"]

    qf = quantize(mlp)
    qstate = qf.init(p, x)
    _, ref_state = qf.apply(qstate, p, x, mode="calibrate")
    ref_out, _ = qf.apply(ref_state, p, x, mode="eval")

    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    ps = {"w1": jax.device_put(p["w1"], NamedSharding(mesh, P(None, "model"))),
          "w2": jax.device_put(p["w2"], NamedSharding(mesh, P("model", None)))}
    calibrate = jax.jit(lambda qs, p, x: qf.apply(qs, p, x, mode="calibrate"))
    _, state = calibrate(qstate, ps, xs)
    obs = state["w1/dot_general"]["input"].observer
    assert float(obs.min_val) == float(x.min()) and float(obs.max_val) == float(x.max()), "global stats"
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, ref_state)
    out, _ = jax.jit(lambda qs, p, x: qf.apply(qs, p, x, mode="eval"))(state, ps, xs)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    assert out.sharding.spec[0] == "data"

    # shard_map with a site inside: per-shard observations merged into global min/max.
    def sm(p, x):
        body = lambda w, xb: xb @ w
        return jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))(p["w1"], x)

    qf2 = quantize(sm)
    qs2 = qf2.init(p, x)
    _, qs2 = jax.jit(lambda qs, p, x: qf2.apply(qs, p, x, mode="calibrate"))(qs2, ps, xs)
    (name,) = qs2
    print("SITE", name)
    obs = qs2[name]["input"].observer
    assert float(obs.min_val) == float(x.min()) and float(obs.max_val) == float(x.max()), (obs, x.min(), x.max())
    out2, _ = jax.jit(lambda qs, p, x: qf2.apply(qs, p, x, mode="eval"))(qs2, ps, xs)
    qf3 = quantize(lambda p, x: x @ p["w1"])
    _, qs3 = qf3.apply(qf3.init(p, x), p, x, mode="calibrate")
    np.testing.assert_allclose(out2, qf3.apply(qs3, p, x, mode="eval")[0], rtol=1e-6, atol=1e-5)
    print("MESH-OK")
    """
)


def test_sharded_inputs_give_global_statistics():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert "MESH-OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
