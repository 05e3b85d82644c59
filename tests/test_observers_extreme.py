"""Observers keep their promise that a state never becomes NaN/inf and qparams stay finite, even for finite
ranges as wide as +-3e38; complex inputs are refused (issue #12, item 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant.observers as obs

HUGE = np.array([-3e38, 1.0, 3e38], np.float32)


def _assert_finite_qparams(observer, state):
    scale, zp = observer.calculate_qparams(state)
    assert np.all(np.isfinite(np.asarray(scale))) and np.all(np.asarray(scale) > 0), scale
    assert np.all(np.isfinite(np.asarray(zp, np.float64))), zp


@pytest.mark.parametrize(
    "observer",
    [obs.MinMaxObserver(), obs.MinMaxObserver(qscheme="per_tensor_symmetric", dtype="qint8"),
     obs.PercentileObserver(percentile=100.0, qscheme="per_tensor_affine")],
    ids=["minmax", "minmax_symmetric", "percentile"],
)
def test_huge_finite_range_gives_finite_scale(observer):
    state = observer.update(observer.init(HUGE), HUGE)
    _assert_finite_qparams(observer, state)


def test_moving_average_state_stays_finite_on_huge_ranges():
    o = obs.MovingAverageMinMaxObserver(averaging_constant=0.5)
    state = o.init()
    for x in (np.float32([3e38, 3.2e38]), np.float32([-3e38, -3.3e38]), HUGE, np.float32([3.4e38]), HUGE):
        state = o.update(state, x)
        assert np.isfinite(float(state.min_val)) and np.isfinite(float(state.max_val)), state
    _assert_finite_qparams(o, state)
    pc = obs.MovingAveragePerChannelMinMaxObserver(averaging_constant=0.5, ch_axis=0)
    s = pc.init(np.zeros((2, 3)))
    for x in (np.float32([[3e38] * 3, [-3e38] * 3]), np.float32([[-3e38] * 3, [3e38] * 3])):
        s = pc.update(s, x)
    assert np.all(np.isfinite(np.asarray(s.min_val))) and np.all(np.isfinite(np.asarray(s.max_val)))
    _assert_finite_qparams(pc, s)


def test_moving_average_ordinary_values_unchanged():
    o = obs.MovingAverageMinMaxObserver()
    s = o.update(o.update(o.init(), np.float32([-1, 2])), np.float32([-3, 5]))
    assert float(s.min_val) == np.float32(-1) + np.float32(0.01) * (np.float32(-3) - np.float32(-1))


def test_histogram_huge_range_stays_finite():
    o = obs.HistogramObserver(bins=64)
    update = jax.jit(o.update)
    state = update(o.init(), np.float32([-1.0, 0.5, 2.0]))
    state = update(state, HUGE)  # the range grows to +-3e38: re-binning must not overflow
    state = update(state, np.float32([-3.3e38, 3.3e38, 0.0]))
    assert np.all(np.isfinite(np.asarray(state.histogram)))
    assert float(jnp.sum(state.histogram)) == pytest.approx(9.0)
    lo, hi = o.search_range(state)
    assert np.isfinite(float(lo)) and np.isfinite(float(hi))
    _assert_finite_qparams(o, state)


@pytest.mark.parametrize("name", ["minmax", "moving_average", "per_channel_minmax", "moving_average_per_channel",
                                  "histogram", "percentile", "mse", "placeholder"])
def test_complex_input_is_refused(name):
    kwargs = {"dtype": "quint8"} if name == "placeholder" else {}
    o = obs.get_observer(name, **kwargs)
    x = np.ones((2, 3), np.complex64) * (1 + 2j)
    with pytest.raises(TypeError, match=rf"{type(o).__name__}: got a complex input \(dtype complex64\)"):
        o.update(o.init(np.ones((2, 3), np.float32)), x)
