"""Fixed / placeholder / percentile / MSE observers and the short-name registry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.ao.quantization import observer as tobs

from jquant import observers as jobs

f32 = lambda a: np.asarray(a, np.float32)


def _heavy_tailed(shape, seed=0):
    return f32(np.random.default_rng(seed).laplace(size=shape) ** 3)


def _torch_qparams(min_val, max_val, **kwargs):
    """torch's own _calculate_qparams on a given range (the oracle for the final formula)."""
    obs = tobs.PerChannelMinMaxObserver(**kwargs) if np.ndim(min_val) else tobs.MinMaxObserver(**kwargs)
    scale, zp = obs._calculate_qparams(torch.tensor(f32(min_val)), torch.tensor(f32(max_val)))
    return scale.numpy().reshape(np.shape(min_val)), zp.numpy().reshape(np.shape(min_val))


def test_fixed_qparams_observer_matches_torch():
    for kwargs, t_kwargs in [
        (dict(scale=1.0 / 256.0, zero_point=0), {}),
        (dict(scale=2.0 / 256.0, zero_point=128), {}),
        (dict(scale=2.0 / 256.0, zero_point=0, dtype="qint8", quant_min=-128, quant_max=127), dict(dtype=torch.qint8)),
    ]:
        t_kwargs = {**kwargs, **t_kwargs}
        ours, theirs = jobs.FixedQParamsObserver(**kwargs), tobs.FixedQParamsObserver(**t_kwargs)
        state = ours.update(ours.init(None), jnp.arange(5.0))
        scale, zp = ours.calculate_qparams(state)
        t_scale, t_zp = theirs.calculate_qparams()
        assert float(scale) == t_scale.item() and int(zp) == t_zp.item()
        assert scale.dtype == jnp.float32 and zp.dtype == jnp.int32


def test_placeholder_observer():
    x = f32([[-1.5, 3.0], [np.nan, 0.25]])
    dynamic = jobs.PlaceholderObserver(dtype="quint8", quant_min=0, quant_max=255, is_dynamic=True)
    # Run-time qparams of the tensor itself = torch's observer formula on its (finite) min/max.
    scale, zp = dynamic.dynamic_qparams(x)
    t_scale, t_zp = _torch_qparams(-1.5, 3.0, dtype=torch.quint8, quant_min=0, quant_max=255)
    assert float(scale) == float(t_scale) and int(zp) == int(t_zp)
    # Memoryless: after another batch only that batch counts; a batch with nothing finite changes nothing.
    state = dynamic.update(dynamic.update(dynamic.init(x), x), f32([0.5, 1.0]))
    assert (float(state.min_val), float(state.max_val)) == (0.5, 1.0)
    same = dynamic.update(state, f32([np.nan, np.inf]))
    assert (float(same.min_val), float(same.max_val)) == (0.5, 1.0)
    assert jobs.PlaceholderObserver(dtype="quint8", compute_dtype="quint8").is_dynamic
    # Float placeholders have no qparams, like torch's.
    fp16 = jobs.PlaceholderObserver(dtype="torch.float16")
    assert fp16.dtype == "float16" and not fp16.is_quantized
    with pytest.raises(ValueError, match="no qparams"):
        fp16.calculate_qparams(fp16.update(fp16.init(x), x))
    with pytest.raises(ValueError, match="dtype"):
        jobs.PlaceholderObserver(dtype="float7")


def test_percentile_100_is_torch_minmax():
    x = _heavy_tailed((16, 32), seed=1)
    for qscheme in ("per_tensor_symmetric", "per_tensor_affine"):
        ours = jobs.PercentileObserver(percentile=100.0, qscheme=qscheme)
        theirs = tobs.MinMaxObserver(dtype=torch.qint8, qscheme=getattr(torch, qscheme))
        state = ours.init(x)
        for batch in (x, 0.5 * x, x[:4] - 3):
            state = ours.update(state, batch)
            theirs(torch.from_numpy(f32(batch)))
        scale, zp = ours.calculate_qparams(state)
        t_scale, t_zp = theirs.calculate_qparams()
        assert float(scale) == t_scale.item() and int(zp) == t_zp.item()


def test_percentile_clips_outliers_like_numpy():
    x = _heavy_tailed((8, 500), seed=2)
    sym = jobs.PercentileObserver(percentile=99.0)
    state = sym.update(sym.init(x), x)
    expected = np.percentile(np.abs(x.astype(np.float64)), 99.0)
    np.testing.assert_allclose(float(state.max_val), expected, rtol=1e-5)
    assert float(state.min_val) == -float(state.max_val) and float(state.max_val) < np.abs(x).max()
    affine = jobs.PercentileObserver(percentile=99.5, qscheme="per_channel_affine", ch_axis=0, dtype="quint8")
    state = affine.update(affine.init(x), x)
    np.testing.assert_allclose(np.asarray(state.min_val), np.percentile(x.astype(np.float64), 0.5, axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(state.max_val), np.percentile(x.astype(np.float64), 99.5, axis=1), rtol=1e-5)
    scale, zp = affine.calculate_qparams(state)
    t_scale, t_zp = _torch_qparams(state.min_val, state.max_val, dtype=torch.quint8)
    np.testing.assert_array_equal(np.asarray(scale), t_scale)
    np.testing.assert_array_equal(np.asarray(zp), t_zp)
    # Non-finite values are ignored.
    dirty = x.copy()
    dirty[:, :3] = [np.nan, np.inf, -np.inf]
    clean = dirty[:, 3:]
    for obs in (sym, affine):
        a, b = obs.update(obs.init(dirty), dirty), obs.update(obs.init(clean), clean)
        np.testing.assert_array_equal(np.asarray(a.min_val), np.asarray(b.min_val))
        np.testing.assert_array_equal(np.asarray(a.max_val), np.asarray(b.max_val))


def _numpy_fake_quant_error(x, lo, hi, qmin, qmax, symmetric):
    """Independent reference: squared error of fake-quantizing x (float64) with the range [lo, hi]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        scale = max(max(-lo, hi) / ((qmax - qmin) / 2), np.finfo(np.float32).eps)
        zp = 0
    else:
        scale = max((hi - lo) / (qmax - qmin), np.finfo(np.float32).eps)
        zp = int(np.clip(qmin - np.round(lo / scale), qmin, qmax))
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return float(np.sum(((q - zp) * scale - x) ** 2))


@pytest.mark.parametrize(
    ("qscheme", "dtype", "quant_min", "quant_max"),
    [("per_channel_symmetric", "qint8", -8, 7), ("per_tensor_affine", "quint8", 0, 15)],
)
def test_mse_observer_finds_the_least_error_range(qscheme, dtype, quant_min, quant_max):
    # 4-bit ranges on Laplace data: clipping the tails clearly pays off.
    w = f32(np.random.default_rng(3).laplace(size=(6, 512)))
    obs = jobs.MSEObserver(
        qscheme=qscheme, dtype=dtype, quant_min=quant_min, quant_max=quant_max, num_candidates=40, ch_axis=0
    )
    state = obs.update(obs.init(w), w)
    qmin, qmax = obs.qrange
    symmetric = qscheme.endswith("symmetric")
    rows = [w[c] for c in range(w.shape[0])] if obs.per_channel else [w.reshape(-1)]
    chosen_lo = np.atleast_1d(np.asarray(state.min_val))
    chosen_hi = np.atleast_1d(np.asarray(state.max_val))
    for row, lo_c, hi_c in zip(rows, chosen_lo, chosen_hi, strict=True):
        row64 = row.astype(np.float64)
        lo, hi = float(row.min()), float(row.max())
        errors = [_numpy_fake_quant_error(row64, r * lo, r * hi, qmin, qmax, symmetric) for r in obs.ratios()]
        chosen = _numpy_fake_quant_error(row64, float(lo_c), float(hi_c), qmin, qmax, symmetric)
        # float32 vs float64 evaluation may reorder near-equal candidates: allow a tiny relative slack.
        assert chosen <= min(errors) * (1 + 1e-4)
        assert chosen < 0.9 * errors[-1]  # clearly better than the plain min/max range
        assert lo <= lo_c <= 0.0 <= hi_c < hi
    scale, zp = obs.calculate_qparams(state)
    assert scale.shape == ((6,) if obs.per_channel else ())


def test_mse_observer_per_channel_equals_per_tensor_per_row_and_jit():
    w = _heavy_tailed((4, 128), seed=4)
    per_channel = jobs.MSEObserver(num_candidates=25, ch_axis=0)
    per_tensor = jobs.MSEObserver(num_candidates=25, qscheme="per_tensor_symmetric")
    state = jax.jit(per_channel.update)(per_channel.init(w), w)
    for c in range(4):
        single = per_tensor.update(per_tensor.init(w[c]), w[c])
        assert float(state.max_val[c]) == float(single.max_val)
    # ch_axis=1 on the transposed weight gives the same result.
    transposed = jobs.MSEObserver(num_candidates=25, ch_axis=-1)
    state_t = transposed.update(transposed.init(w.T), w.T)
    np.testing.assert_array_equal(np.asarray(state_t.max_val), np.asarray(state.max_val))


def test_registry_short_names():
    assert isinstance(jobs.get_observer("minmax", dtype="qint8"), jobs.MinMaxObserver)
    assert jobs.get_observer("moving_average") == jobs.MovingAverageMinMaxObserver()
    assert jobs.get_observer("per_channel_minmax", ch_axis=1) == jobs.PerChannelMinMaxObserver(ch_axis=1)
    assert isinstance(jobs.get_observer("moving_average_per_channel"), jobs.MovingAveragePerChannelMinMaxObserver)
    assert isinstance(jobs.get_observer("histogram", bins=64), jobs.HistogramObserver)
    assert jobs.get_observer("percentile", percentile=99.9).percentile == 99.9
    assert isinstance(jobs.get_observer("mse"), jobs.MSEObserver)
    assert jobs.get_observer("fixed", scale=0.5, zero_point=3).calculate_qparams()[1] == 3
    assert isinstance(jobs.get_observer("placeholder"), jobs.PlaceholderObserver)
    assert isinstance(jobs.get_observer("HistogramObserver"), jobs.HistogramObserver)
    with pytest.raises(ValueError, match="unknown observer 'minmaxx'.*allowed: minmax"):
        jobs.get_observer("minmaxx")
    with pytest.raises(TypeError, match="get_observer\\('minmax'\\)"):
        jobs.get_observer("minmax", bins=3)


def test_top_level_exports():
    import jquant

    assert jquant.observers.MinMaxObserver is jobs.MinMaxObserver
    assert jquant.get_observer is jobs.get_observer and jquant.HistogramObserver is jobs.HistogramObserver


def test_observers_are_hashable_jit_static_arguments():
    obs = jobs.PercentileObserver(percentile=99.0)
    calc = jax.jit(lambda o, s: o.calculate_qparams(s), static_argnums=0)
    x = _heavy_tailed((50,))
    state = obs.update(obs.init(x), x)
    np.testing.assert_array_equal(np.asarray(calc(obs, state)[0]), np.asarray(obs.calculate_qparams(state)[0]))
    assert len({obs, jobs.PercentileObserver(percentile=99.0), jobs.PercentileObserver(percentile=98.0)}) == 2


def test_sharded_inputs():
    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = _heavy_tailed((4 * len(devices), 8), seed=6)
    x_sharded = jax.device_put(x, sharding)
    for obs in (jobs.MinMaxObserver(), jobs.PerChannelMinMaxObserver(ch_axis=1), jobs.HistogramObserver(bins=32)):
        sharded = jax.jit(obs.update)(obs.init(x), x_sharded)
        plain = obs.update(obs.init(x), x)
        for a, b in zip(sharded, plain, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
