"""Min/max observer family against torch.ao.quantization (the oracle): exact scale and zero point."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.ao.quantization import observer as tobs

from jquant import observers as jobs

TORCH_DTYPES = {
    "quint8": torch.quint8,
    "qint8": torch.qint8,
    "int16": torch.int16,
    "uint16": torch.uint16,
    "int32": torch.int32,
}
TORCH_QSCHEMES = {
    "per_tensor_affine": torch.per_tensor_affine,
    "per_tensor_symmetric": torch.per_tensor_symmetric,
    "per_channel_affine": torch.per_channel_affine,
    "per_channel_symmetric": torch.per_channel_symmetric,
    "per_channel_affine_float_qparams": torch.per_channel_affine_float_qparams,
}


def _sequences(shape: tuple[int, ...]) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(sum(shape))
    f = lambda a: np.asarray(a, np.float32)
    normal = lambda s, m=0.0: f(rng.standard_normal(shape) * s + m)
    return {
        "mixed": [
            normal(3.0),
            f(np.abs(normal(1.0)) + 0.5),
            f(np.zeros(shape)),
            f(np.full(shape, 2.5)),
            normal(0.1, -5),
        ],
        "zeros_first": [f(np.zeros(shape)), f(np.full(shape, -1.25)), normal(20.0, 3.0)],
        "positive": [f(rng.uniform(0.5, 2.0, shape)), f(rng.uniform(1.0, 9.0, shape)), f(rng.uniform(0.1, 0.2, shape))],
        "constant": [f(np.full(shape, 0.7)), f(np.full(shape, 0.7)), f(np.full(shape, 0.7))],
    }


def _run_both(jax_obs, torch_obs, batches):
    state = jax_obs.init(batches[0])
    for x in batches:
        state = jax_obs.update(state, jnp.asarray(x))
        torch_obs(torch.from_numpy(x))
    return jax_obs.calculate_qparams(state), torch_obs.calculate_qparams()


def _assert_qparams_equal(ours, theirs):
    scale, zp = (np.asarray(v) for v in ours)
    t_scale, t_zp = (v.detach().numpy() for v in theirs)
    np.testing.assert_array_equal(scale.reshape(-1), t_scale.astype(np.float32).reshape(-1))
    np.testing.assert_array_equal(zp.reshape(-1), t_zp.reshape(-1))


def _torch_observer(cls, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that reduce_range is deprecated
        return cls(**kwargs)


PER_TENSOR_CASES = [
    (dtype, qscheme, reduce_range)
    for dtype in TORCH_DTYPES
    for qscheme in ("per_tensor_affine", "per_tensor_symmetric")
    for reduce_range in (False, True)
    if not (dtype == "quint8" and qscheme == "per_tensor_symmetric" and reduce_range)
]


@pytest.mark.parametrize("moving", [False, True], ids=["minmax", "moving_average"])
@pytest.mark.parametrize(("dtype", "qscheme", "reduce_range"), PER_TENSOR_CASES)
def test_per_tensor_matches_torch(moving, dtype, qscheme, reduce_range):
    kwargs = dict(dtype=dtype, qscheme=qscheme, reduce_range=reduce_range)
    t_kwargs = dict(dtype=TORCH_DTYPES[dtype], qscheme=TORCH_QSCHEMES[qscheme], reduce_range=reduce_range)
    if moving:
        kwargs["averaging_constant"] = t_kwargs["averaging_constant"] = 0.3
    for name, batches in _sequences((7, 9)).items():
        ours_cls = jobs.MovingAverageMinMaxObserver if moving else jobs.MinMaxObserver
        theirs_cls = tobs.MovingAverageMinMaxObserver if moving else tobs.MinMaxObserver
        ours, theirs = _run_both(ours_cls(**kwargs), _torch_observer(theirs_cls, **t_kwargs), batches)
        try:
            _assert_qparams_equal(ours, theirs)
        except AssertionError as err:
            raise AssertionError(f"sequence {name!r}") from err


CUSTOM_RANGES = [("quint8", 0, 15), ("qint8", -8, 7), ("qint8", -127, 127), ("quint8", 0, 200), ("int16", -1000, 1000)]


@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize(("dtype", "quant_min", "quant_max"), CUSTOM_RANGES)
@pytest.mark.parametrize("qscheme", ["per_tensor_affine", "per_tensor_symmetric"])
def test_custom_range_matches_torch(dtype, quant_min, quant_max, reduce_range, qscheme):
    common = dict(quant_min=quant_min, quant_max=quant_max, reduce_range=reduce_range)
    if dtype == "quint8" and qscheme == "per_tensor_symmetric" and reduce_range:
        # torch refuses this combination; so must we (at construction or at the latest when computing qparams)
        with pytest.raises(NotImplementedError):
            tobs.MovingAverageMinMaxObserver(dtype=TORCH_DTYPES[dtype], qscheme=TORCH_QSCHEMES[qscheme], **common)
        with pytest.raises(ValueError, match="reduce_range"):
            obs = jobs.MovingAverageMinMaxObserver(dtype=dtype, qscheme=qscheme, **common)
            obs.calculate_qparams(obs.update(obs.init(np.ones(3, np.float32)), np.ones(3, np.float32)))
        return
    for name, batches in _sequences((5, 3)).items():
        ours = jobs.MovingAverageMinMaxObserver(dtype=dtype, qscheme=qscheme, **common)
        theirs = _torch_observer(
            tobs.MovingAverageMinMaxObserver, dtype=TORCH_DTYPES[dtype], qscheme=TORCH_QSCHEMES[qscheme], **common
        )
        try:
            _assert_qparams_equal(*_run_both(ours, theirs, batches))
        except AssertionError as err:
            raise AssertionError(f"sequence {name!r}") from err


_PER_CHANNEL_CONFIGS = [
    (dtype, qscheme, reduce_range)
    for dtype in ("quint8", "qint8", "int16")
    for qscheme in ("per_channel_affine", "per_channel_symmetric", "per_channel_affine_float_qparams")
    for reduce_range in (False, True)
    if not (dtype == "quint8" and qscheme == "per_channel_symmetric" and reduce_range)
]
# Each configuration runs on one channel axis, cycling through 0, 1 and -1 (keeps the suite small).
PER_CHANNEL_CASES = [(*cfg, (0, 1, -1)[i % 3]) for i, cfg in enumerate(_PER_CHANNEL_CONFIGS)]


@pytest.mark.parametrize("moving", [False, True], ids=["minmax", "moving_average"])
@pytest.mark.parametrize(("dtype", "qscheme", "reduce_range", "ch_axis"), PER_CHANNEL_CASES)
def test_per_channel_matches_torch(moving, dtype, qscheme, reduce_range, ch_axis):
    kwargs = dict(ch_axis=ch_axis, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range)
    t_kwargs = dict(kwargs, dtype=TORCH_DTYPES[dtype], qscheme=TORCH_QSCHEMES[qscheme])
    if moving:
        kwargs["averaging_constant"] = t_kwargs["averaging_constant"] = 0.25
    ours_cls = jobs.MovingAveragePerChannelMinMaxObserver if moving else jobs.PerChannelMinMaxObserver
    theirs_cls = tobs.MovingAveragePerChannelMinMaxObserver if moving else tobs.PerChannelMinMaxObserver
    for name, batches in _sequences((4, 5, 6)).items():
        # Give channels different ranges so that per-channel reduction is really exercised.
        spread = np.float32(1.0) + np.arange(batches[0].shape[ch_axis], dtype=np.float32)
        spread = spread.reshape([-1 if a == ch_axis % 3 else 1 for a in range(3)])
        batches = [np.asarray(b * spread, np.float32) for b in batches]
        ours, theirs = _run_both(ours_cls(**kwargs), _torch_observer(theirs_cls, **t_kwargs), batches)
        try:
            _assert_qparams_equal(ours, theirs)
        except AssertionError as err:
            raise AssertionError(f"sequence {name!r}") from err


def test_defaults_match_torch():
    assert jobs.MinMaxObserver() == jobs.MinMaxObserver(
        dtype="torch.quint8", qscheme="torch.per_tensor_affine", reduce_range=False, eps=torch.finfo().eps
    )
    assert jobs.MovingAverageMinMaxObserver().averaging_constant == 0.01
    pc = jobs.PerChannelMinMaxObserver()
    assert (pc.ch_axis, pc.dtype, pc.qscheme) == (0, "uint8", "per_channel_affine")
    assert hash(jobs.MinMaxObserver(dtype="qint8")) == hash(jobs.MinMaxObserver(dtype="int8"))
    # Default moving-average observer against torch's default (c = 0.01) over several batches.
    batches = _sequences((10,))["mixed"]
    _assert_qparams_equal(*_run_both(jobs.MovingAverageMinMaxObserver(), tobs.MovingAverageMinMaxObserver(), batches))


def test_unobserved_state_gives_torch_default():
    obs = jobs.MinMaxObserver(dtype="qint8")
    scale, zp = obs.calculate_qparams(obs.init(jnp.ones(3)))
    assert float(scale) == 1.0 and int(zp) == 0


def test_jit_update_is_identical():
    batches = _sequences((6, 8))["mixed"]
    for obs in (
        jobs.MinMaxObserver(dtype="qint8", qscheme="per_tensor_symmetric"),
        jobs.MovingAverageMinMaxObserver(averaging_constant=0.1),
        jobs.PerChannelMinMaxObserver(ch_axis=1, dtype="qint8"),
        jobs.MovingAveragePerChannelMinMaxObserver(averaging_constant=0.2, ch_axis=-1),
    ):
        eager = jitted = obs.init(batches[0])
        update = jax.jit(obs.update)
        for x in batches:
            eager = obs.update(eager, x)
            jitted = update(jitted, x)
        for a, b in zip(obs.calculate_qparams(eager), jax.jit(obs.calculate_qparams)(jitted), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vmap_over_states_matches_separate_runs():
    obs = jobs.MovingAveragePerChannelMinMaxObserver(averaging_constant=0.5, ch_axis=1, dtype="qint8")
    rng = np.random.default_rng(3)
    xs = [np.asarray(rng.standard_normal((3, 4, 5)) * (i + 1), np.float32) for i in range(3)]  # 3 models
    states = jax.vmap(obs.init)(jnp.asarray(xs[0]))
    batched_update = jax.jit(jax.vmap(obs.update))
    for x in xs:
        states = batched_update(states, jnp.asarray(x))
    scales, zps = jax.vmap(obs.calculate_qparams)(states)
    assert scales.shape == (3, 5)
    for m in range(3):
        single = obs.init(xs[0][m])
        for x in xs:
            single = obs.update(single, x[m])
        np.testing.assert_array_equal(np.asarray(states.min_val[m]), np.asarray(single.min_val))
        np.testing.assert_array_equal(np.asarray(states.max_val[m]), np.asarray(single.max_val))
        s, z = obs.calculate_qparams(single)
        # Under vmap, XLA turns exact_divide's division by a broadcast divisor into a reciprocal multiply
        # (numerics/exact.py), so the vmapped scale may be 1 ulp off; the states above are exact.
        np.testing.assert_allclose(np.asarray(scales[m]), np.asarray(s), rtol=2.5e-7, atol=0)
        np.testing.assert_array_equal(np.asarray(zps[m]), np.asarray(z))


def test_non_finite_values_are_ignored():
    x = np.asarray([[1.0, np.nan, -2.0], [np.inf, 0.5, -np.inf]], np.float32)
    finite = np.asarray([1.0, -2.0, 0.5], np.float32)
    for obs in (jobs.MinMaxObserver(), jobs.MovingAverageMinMaxObserver(averaging_constant=0.5)):
        state = obs.update(obs.init(x), x)
        assert (float(state.min_val), float(state.max_val)) == (-2.0, 1.0)
        reference = obs.update(obs.init(finite), finite)
        # A batch without any finite value leaves the state unchanged.
        after = obs.update(state, jnp.asarray([np.nan, np.inf, -np.inf]))
        assert after == state or all(np.array_equal(a, b) for a, b in zip(after, state, strict=True))
        np.testing.assert_array_equal(obs.calculate_qparams(after)[0], obs.calculate_qparams(reference)[0])
        # An empty batch too.
        empty = obs.update(state, jnp.zeros((0,)))
        np.testing.assert_array_equal(np.asarray(empty.min_val), np.asarray(state.min_val))


def test_non_finite_per_channel_and_first_batch():
    obs = jobs.MovingAveragePerChannelMinMaxObserver(averaging_constant=0.5)
    x = np.asarray([[np.nan, np.nan], [1.0, 3.0]], np.float32)  # channel 0 has no finite value
    state = obs.update(obs.init(x), x)
    assert np.isposinf(state.min_val[0]) and np.isneginf(state.max_val[0])
    assert (float(state.min_val[1]), float(state.max_val[1])) == (1.0, 3.0)
    # Channel 0's first finite batch sets its range directly; channel 1 moves by c = 0.5.
    state = obs.update(state, jnp.asarray([[4.0, 6.0], [5.0, 5.0]]))
    np.testing.assert_array_equal(np.asarray(state.min_val), [4.0, 3.0])
    np.testing.assert_array_equal(np.asarray(state.max_val), [6.0, 4.0])
    assert np.isfinite(np.asarray(obs.calculate_qparams(state)[0])).all()
