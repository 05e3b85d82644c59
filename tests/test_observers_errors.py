"""Bad observer arguments raise clear errors naming the culprit; non-finite inputs never poison a state."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jquant import observers as jobs


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: jobs.MinMaxObserver(dtype="qint9"), r"dtype: unknown quantized dtype 'qint9'; allowed: .*int8"),
        (lambda: jobs.MinMaxObserver(qscheme="per_tensor_afine"), r"qscheme: unknown qscheme 'per_tensor_afine'"),
        (lambda: jobs.MinMaxObserver(quant_min=0, quant_max=0), r"MinMaxObserver: quant_min/quant_max: need quant_min"),
        (
            lambda: jobs.MinMaxObserver(quant_min=1, quant_max=10),
            r"MinMaxObserver: .*quant_min=1, quant_max=10 must include 0",
        ),
        (lambda: jobs.MinMaxObserver(quant_min=0, quant_max=300), r"MinMaxObserver: .*outside the uint8 range"),
        (lambda: jobs.MinMaxObserver(quant_min=-4), r"MinMaxObserver: give both quant_min and quant_max"),
        (lambda: jobs.MinMaxObserver(qscheme="per_channel_affine"), r"MinMaxObserver: qscheme='per_channel_affine'"),
        (lambda: jobs.HistogramObserver(qscheme="per_channel_symmetric"), r"HistogramObserver: qscheme="),
        (lambda: jobs.PerChannelMinMaxObserver(qscheme="per_tensor_affine"), r"PerChannelMinMaxObserver: qscheme="),
        (
            lambda: jobs.MinMaxObserver(qscheme="per_tensor_symmetric", reduce_range=True),
            r"MinMaxObserver: reduce_range=True is not supported for symmetric quint8",
        ),
        (lambda: jobs.MinMaxObserver(eps=0.0), r"MinMaxObserver: eps must be > 0"),
        (lambda: jobs.MovingAverageMinMaxObserver(averaging_constant=0.0), r"averaging_constant must be in \(0, 1\]"),
        (lambda: jobs.MovingAverageMinMaxObserver(is_dynamic=True), r"is_dynamic=True needs averaging_constant=1"),
        (
            lambda: jobs.MovingAveragePerChannelMinMaxObserver(averaging_constant=2),
            r"MovingAveragePerChannelMinMaxObserver: averaging_constant",
        ),
        (lambda: jobs.PerChannelMinMaxObserver(is_dynamic=True), r"PerChannelMinMaxObserver: is_dynamic=True"),
        (lambda: jobs.HistogramObserver(upsample_rate=0), r"HistogramObserver: upsample_rate must be a positive"),
        (lambda: jobs.HistogramObserver(dtype="float8_e4m3fn"), r"HistogramObserver: dtype='float8_e4m3fn'"),
        (lambda: jobs.FixedQParamsObserver(scale=0.0, zero_point=0), r"FixedQParamsObserver: scale must be"),
        (lambda: jobs.FixedQParamsObserver(scale=0.1, zero_point=300), r"FixedQParamsObserver: zero_point=300"),
        (lambda: jobs.PercentileObserver(percentile=0), r"PercentileObserver: percentile must be in \(0, 100\]"),
        (lambda: jobs.MSEObserver(num_candidates=0), r"MSEObserver: num_candidates must be a positive integer"),
        (lambda: jobs.MSEObserver(min_ratio=1.5), r"MSEObserver: min_ratio"),
        (
            lambda: jobs.MSEObserver(qscheme="per_channel_affine_float_qparams"),
            r"MSEObserver: qscheme per_channel_affine_float_qparams",
        ),
    ],
)
def test_bad_constructor_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_torch_style_names_are_accepted_and_canonical():
    obs = jobs.PerChannelMinMaxObserver(dtype="torch.qint8", qscheme="torch.per_channel_symmetric")
    assert (obs.dtype, obs.qscheme) == ("int8", "per_channel_symmetric")
    assert obs == jobs.PerChannelMinMaxObserver(dtype="int8", qscheme="per_channel_symmetric")


def test_ch_axis_is_checked_at_init_with_the_shape():
    x = jnp.ones((2, 3))
    for cls in (jobs.PerChannelMinMaxObserver, jobs.MovingAveragePerChannelMinMaxObserver):
        with pytest.raises(ValueError, match=r"ch_axis=2 is out of range for an input of shape \(2, 3\)"):
            cls(ch_axis=2).init(x)
    with pytest.raises(ValueError, match=r"ch_axis=-3 is out of range"):
        jobs.MSEObserver(ch_axis=-3).init(x)
    with pytest.raises(ValueError, match=r"ch_axis=5"):
        jobs.PercentileObserver(ch_axis=5, qscheme="per_channel_symmetric").init(x)
    with pytest.raises(ValueError, match=r"shape \(\)"):
        jobs.PerChannelMinMaxObserver().init(jnp.float32(1.0))
    obs = jobs.PerChannelMinMaxObserver(ch_axis=1)
    state = obs.init(x)
    with pytest.raises(ValueError, match=r"input of shape \(2, 4\) has 4 channels on ch_axis=1, .* initialized for 3"):
        obs.update(state, jnp.ones((2, 4)))


def _observers_and_inputs():
    x = np.linspace(-3.0, 5.0, 24, dtype=np.float32).reshape(4, 6)
    return x, [
        jobs.MinMaxObserver(),
        jobs.MovingAverageMinMaxObserver(averaging_constant=0.5),
        jobs.PerChannelMinMaxObserver(ch_axis=1),
        jobs.MovingAveragePerChannelMinMaxObserver(ch_axis=1),
        jobs.HistogramObserver(bins=64),
        jobs.PercentileObserver(percentile=90.0),
        jobs.PercentileObserver(percentile=90.0, qscheme="per_channel_affine", ch_axis=1, dtype="quint8"),
        jobs.MSEObserver(num_candidates=10, ch_axis=1),
        jobs.PlaceholderObserver(dtype="quint8", is_dynamic=True),
    ]


def test_non_finite_never_poisons_any_observer():
    x, observers = _observers_and_inputs()
    dirty = x.copy()
    dirty[0, :] = [np.nan, np.inf, -np.inf, np.nan, 1e3, -1e3]  # row 0: only 1e3/-1e3 are finite
    nothing_finite = np.full_like(x, np.nan)
    nothing_finite[::2] = np.inf
    for obs in observers:
        first = obs.update(obs.init(x), x)
        state = obs.update(first, dirty)
        leaves = [np.asarray(leaf) for leaf in state]
        name = type(obs).__name__
        assert not any(np.isnan(leaf).any() for leaf in leaves), name
        # A batch with nothing finite leaves the state exactly as it was.
        after = obs.update(state, nothing_finite)
        for a, b in zip(after, state, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        scale, zp = obs.calculate_qparams(after)
        assert np.isfinite(np.asarray(scale)).all() and (np.asarray(scale) > 0).all(), name


def test_min_max_observers_ignore_exactly_the_non_finite_values():
    x, observers = _observers_and_inputs()
    dirty = np.concatenate([x, np.full((1, 6), np.nan, np.float32), np.full((1, 6), np.inf, np.float32)])
    for obs in observers[:4]:
        a = obs.update(obs.update(obs.init(x), x), dirty)
        b = obs.update(obs.update(obs.init(x), x), x)
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=type(obs).__name__)
