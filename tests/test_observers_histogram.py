"""HistogramObserver against torch's (the oracle): histogram state, searched range and qparams."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.ao.quantization import observer as tobs

from jquant import observers as jobs
from jquant.observers.histogram import fma_f32, torch_linspace

f32 = lambda a: np.asarray(a, np.float32)


N = 600  # one batch size everywhere: eager JAX compiles each op once per shape


def _sequences() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(7)
    normal, uniform = rng.standard_normal, rng.uniform
    return {
        "growing": [f32(normal(N)), f32(normal(N) * 3), f32(normal(N) * 10 + 5)],
        "narrow_after_wide": [f32(uniform(-8, 8, N)), f32(uniform(-1, 1, N)), f32(uniform(-9, 12, N))],
        "positive": [f32(uniform(0.5, 1, N)), f32(uniform(0, 2, N)), f32(rng.exponential(1.0, N))],
        "constant_first": [f32(np.full(N, 2.0)), f32(np.full(N, 2.0)), f32(normal(N))],
        "zeros": [f32(np.zeros(N)), f32(np.zeros(N)), f32(np.zeros(N))],
        "heavy_tails": [f32(rng.laplace(size=N) ** 3) for _ in range(3)],
    }


def _torch_histogram_observer(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tobs.HistogramObserver(**kwargs)


def _compare(ours: jobs.HistogramObserver, theirs, batches, update=None):
    update = update or ours.update
    state = ours.init(batches[0])
    for x in batches:
        state = update(state, jnp.asarray(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about +-inf
            theirs(torch.from_numpy(x[~np.isnan(x)]))
    np.testing.assert_array_equal(np.asarray(state.histogram), theirs.histogram.numpy())
    assert float(state.min_val) == theirs.min_val.item() and float(state.max_val) == theirs.max_val.item()
    scale, zp = ours.calculate_qparams(state)
    t_scale, t_zp = theirs.calculate_qparams()
    assert (float(scale), int(zp)) == (t_scale.item(), t_zp.item())  # bit for bit
    return state


@pytest.mark.parametrize("name", list(_sequences()))
def test_default_histogram_observer_matches_torch(name):
    _compare(jobs.HistogramObserver(), _torch_histogram_observer(), _sequences()[name])


CONFIGS = [
    dict(dtype="qint8", qscheme="per_tensor_symmetric"),
    dict(dtype="qint8", qscheme="per_tensor_affine", reduce_range=True),
    dict(dtype="quint8", reduce_range=True),
    dict(dtype="quint8", quant_min=0, quant_max=15),
    dict(bins=256, dtype="qint8"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_configurations_match_torch(config):
    t_config = dict(config)
    t_config["dtype"] = getattr(torch, config["dtype"])
    if "qscheme" in config:
        t_config["qscheme"] = getattr(torch, config["qscheme"])
    sequences = _sequences()
    for name in ("growing", "positive", "heavy_tails"):
        ours = jobs.HistogramObserver(**config)
        # A new bin count means new shapes: one jit compile is cheaper than recompiling every eager op.
        update = jax.jit(ours.update) if ours.bins != 2048 else None
        try:
            _compare(ours, _torch_histogram_observer(**t_config), sequences[name], update)
        except AssertionError as err:
            raise AssertionError(f"sequence {name!r}") from err


def test_non_finite_values_are_dropped():
    rng = np.random.default_rng(11)
    batches = [f32(rng.standard_normal(N)), f32(np.full(N, np.nan)), f32(rng.standard_normal(N) * 4)]
    batches[0][:3] = [np.inf, -np.inf, np.nan]
    batches[1][::2] = np.inf  # nothing finite: the state must not change
    batches[2][-2:] = [np.nan, -np.inf]
    obs = jobs.HistogramObserver()
    state = _compare(obs, _torch_histogram_observer(), batches)
    assert np.isfinite(np.asarray(state.histogram)).all()
    empty = obs.update(obs.init(None), batches[1])
    assert np.isposinf(float(empty.min_val)) and not np.asarray(empty.histogram).any()
    scale, zp = obs.calculate_qparams(empty)
    assert (float(scale), int(zp)) == (1.0, 0)


def test_jit_and_vmap():
    obs = jobs.HistogramObserver(dtype="qint8")
    batches = _sequences()["growing"]
    _compare(obs, _torch_histogram_observer(dtype=torch.qint8), batches, update=jax.jit(obs.update))
    # Two independent observers stepped together under vmap give the same results as separate runs.
    stacked = [jnp.stack([x, -2 * x]) for x in batches]
    states = jax.vmap(obs.init)(stacked[0])
    for x in stacked:
        states = jax.jit(jax.vmap(obs.update))(states, x)
    scales, zps = jax.jit(jax.vmap(obs.calculate_qparams))(states)
    for m in range(2):
        single = obs.init(None)
        for x in stacked:
            single = obs.update(single, x[m])
        np.testing.assert_array_equal(np.asarray(states.histogram[m]), np.asarray(single.histogram))
        scale, zp = obs.calculate_qparams(single)
        assert (float(scales[m]), int(zps[m])) == (float(scale), int(zp))


def test_torch_linspace_is_bit_exact():
    rng = np.random.default_rng(5)
    for _ in range(10):
        lo, hi = np.sort(f32(rng.standard_normal(2) * rng.uniform(0.01, 1000)))
        for steps in (2049, 32769):
            expected = torch.linspace(torch.tensor(lo), torch.tensor(hi), steps).numpy()
            np.testing.assert_array_equal(np.asarray(torch_linspace(lo, hi, steps)), expected)


def test_fma_is_correctly_rounded():
    rng = np.random.default_rng(9)
    a, b, c = (f32(rng.standard_normal(20000) * 10.0 ** rng.integers(-3, 4, 20000)) for _ in range(3))
    exact = (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)
    # float64 holds a*b exactly; the float64 sum then float32 rounding differs from a single rounding only
    # when the float64 sum lands exactly on a float32 midpoint (probability ~2**-29 per value).
    np.testing.assert_array_equal(np.asarray(fma_f32(a, b, c)), exact)


def test_bad_arguments():
    with pytest.raises(ValueError, match="bins"):
        jobs.HistogramObserver(bins=0)
    with pytest.raises(ValueError, match="per-channel"):
        jobs.HistogramObserver(qscheme="per_channel_affine")
    with pytest.raises(ValueError, match="is_dynamic"):
        jobs.HistogramObserver(is_dynamic=True)


def _random_batches(seed: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {
        f"normal_{i}": [f32(rng.standard_normal(N) * rng.uniform(0.01, 100) + rng.uniform(-10, 10)) for _ in "ab"]
        for i in range(4)
    }
    out["uniform"] = [f32(rng.uniform(-3, 7, N)), f32(rng.uniform(-5, 9, N))]
    out["exponential"] = [f32(rng.exponential(2.0, N)), f32(rng.exponential(5.0, N))]
    out["lognormal"] = [f32(rng.lognormal(0.0, 1.5, N)) - 1, f32(rng.lognormal(0.0, 2.0, N))]
    out["laplace_cubed"] = [f32(rng.laplace(size=N) ** 3) for _ in "ab"]
    return out


@pytest.mark.parametrize(
    ("bins", "config"),
    [(2048, {}), (256, dict(dtype="qint8", qscheme="per_tensor_symmetric")), (100, dict(reduce_range=True))],
)
def test_jitted_qparams_are_bit_exact_with_torch(bins, config):
    # XLA:CPU fuses min + width * bin into one FMA under jit (its optimization barriers are gone before fusion):
    # the searched range, and then the scale, came out one ulp off torch's while eager was exact
    ours = jobs.HistogramObserver(bins=bins, **config)
    t_config = {k: getattr(torch, v) if k in ("dtype", "qscheme") else v for k, v in config.items()}
    update, search, qparams = jax.jit(ours.update), jax.jit(ours.search_range), jax.jit(ours.calculate_qparams)
    for name, batches in _random_batches(bins).items():
        theirs = _torch_histogram_observer(bins=bins, **t_config)
        state = ours.init(None)
        for x in batches:
            state = update(state, jnp.asarray(x))
            theirs(torch.from_numpy(x))
        np.testing.assert_array_equal(np.asarray(state.histogram), theirs.histogram.numpy(), err_msg=name)
        t_min, t_max = theirs._non_linear_param_search()
        t_scale, t_zp = theirs.calculate_qparams()
        new_min, new_max = search(state)
        scale, zp = qparams(state)
        got = (float(new_min), float(new_max), float(scale), int(zp))
        assert got == (t_min.item(), t_max.item(), t_scale.item(), t_zp.item()), name
