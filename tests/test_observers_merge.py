"""``observer.merge(state, axis_names, previous)`` under ``jax.shard_map`` against the unsharded result, for
every observer kind (issue #9). Runs in a subprocess so that XLA_FLAGS (4 CPU devices) applies before jax
starts, as tests/test_transform_mesh.py does."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    import jquant.observers as O

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    # rows are sharded 4 ways; each shard sees a different range
    x1 = (rng.standard_normal((16, 6)) * np.repeat([1, 3, 0.5, 2], 4)[:, None]).astype(np.float32)
    x2 = (rng.standard_normal((16, 6)) * np.repeat([4, 1, 1, 2], 4)[:, None] + 1).astype(np.float32)
    x1[5, 2] = np.nan  # non-finite values are skipped on every path

    compiled = {}

    def sharded(observer, previous, x):
        if observer not in compiled:
            def body(prev, xb):
                return observer.merge(observer.update(prev, xb), "data", prev)
            specs = jax.tree_util.tree_map(lambda _: P(), previous)
            f = jax.shard_map(body, mesh=mesh, in_specs=(specs, P("data")), out_specs=specs, check_vma=False)
            compiled[observer] = jax.jit(f)
        return compiled[observer](previous, x)

    def same(a, b, what):
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=what)

    def blocks(x):
        return np.split(x, 4)

    exact = {
        "minmax": O.MinMaxObserver(),
        "moving_average": O.MovingAverageMinMaxObserver(averaging_constant=0.3),
        "per_channel_minmax": O.PerChannelMinMaxObserver(ch_axis=1),
        "moving_average_per_channel": O.MovingAveragePerChannelMinMaxObserver(ch_axis=1),
        "placeholder": O.PlaceholderObserver(dtype="quint8", is_dynamic=True),
        "fixed": O.FixedQParamsObserver(scale=0.1, zero_point=3),
        "percentile_100": O.PercentileObserver(percentile=100.0),
    }
    for name, o in exact.items():
        update = jax.jit(o.update)
        ref = update(update(o.init(x1), x1), x2)
        got = sharded(o, sharded(o, o.init(x1), x1), x2)
        same(got, ref, name)
        if name != "fixed":
            same(o.calculate_qparams(got), o.calculate_qparams(ref), name + " qparams")
        print("OK", name)

    # Percentile / MSE: the merged state is that of observing the shards' blocks as separate batches.
    for name, o in {"percentile": O.PercentileObserver(percentile=90.0, qscheme="per_tensor_affine"),
                    "percentile_per_channel": O.PercentileObserver(qscheme="per_channel_symmetric", ch_axis=1),
                    "mse": O.MSEObserver(ch_axis=1, num_candidates=20)}.items():
        ref, update = o.init(x1), jax.jit(o.update)
        for x in (x1, x2):
            for b in blocks(x):
                ref = update(ref, b)
        got = sharded(o, sharded(o, o.init(x1), x1), x2)
        same(got, ref, name)
        print("OK", name)

    # Histogram: every shard sees the global range (each block holds the global min and max): exact.
    h = O.HistogramObserver(bins=32)
    h_update = jax.jit(h.update)
    y = x1.copy()
    y[0::4, 0] = np.nanmin(x1)
    y[1::4, 0] = np.nanmax(x1)
    ref = h_update(h.init(), y)
    got = sharded(h, h.init(), y)
    same(got, ref, "histogram, shared range")
    # Different shard ranges, two steps: same range, counts conserved, each count within one bin.
    ref = h_update(h_update(h.init(), x1), x2)
    got = sharded(h, sharded(h, h.init(), x1), x2)
    same((got.min_val, got.max_val), (ref.min_val, ref.max_val), "histogram range")
    assert float(got.histogram.sum()) == float(ref.histogram.sum()) == np.isfinite(x1).sum() + x2.size
    cdf_gap = np.abs(np.cumsum(got.histogram) - np.cumsum(ref.histogram)).max()
    worst_bin = max(float(ref.histogram.max()), float(got.histogram.max()))
    assert cdf_gap <= 2 * worst_bin, (cdf_gap, worst_bin)
    # the old code kept the global range but one shard's histogram: a quarter of the counts
    one_shard = h_update(h.init(), blocks(x1)[0])
    assert float(one_shard.histogram.sum()) < float(got.histogram.sum()) / 2
    print("OK histogram")
    print("MERGE-OK")
    """
)


def test_every_observer_merges_under_shard_map():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert "MERGE-OK" in result.stdout, result.stdout[-3000:] + result.stderr[-5000:]
