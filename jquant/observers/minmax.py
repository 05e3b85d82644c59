"""The min/max observer family, with torch's names, arguments, defaults and numbers.

Each observer is an immutable (frozen, hashable) configuration with pure methods:
``init(x) -> state`` (an empty state shaped for ``x``), ``update(state, x) -> state`` and
``calculate_qparams(state) -> (scale, zero_point)``. The state is a :class:`MinMaxState` pytree, so
``update`` can be jitted, vmapped over a batch of states and fed sharded inputs. Per-tensor qparams are
scalars (torch returns shape ``(1,)``); per-channel qparams have shape ``(channels,)``.

Non-finite rule: NaN and +-inf are ignored; a batch (or channel) with no finite value leaves the state
(or that channel) unchanged. torch instead lets NaN/inf into min/max.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jquant.numerics.exact import unfused_multiply
from jquant.numerics.qparams import FLOAT32_EPS
from jquant.observers._base import (
    MinMaxState,
    UniformObserverMixin,
    channel_reduce_axes,
    check_channels,
    empty_minmax_state,
    finite_aminmax,
    merge_minmax,
    normalize_ch_axis,
    real_input,
)


def _moving_average(old: jnp.ndarray, batch: jnp.ndarray, averaging_constant: float) -> jnp.ndarray:
    """``old + c * (batch - old)`` rounded step by step in float32, as torch does (no FMA).

    Where ``batch - old`` overflows (finite ranges near +-3.4e38; torch's state becomes inf, then NaN) the
    convex combination ``(1 - c) * old + c * batch`` is used instead, clipped to ``[old, batch]``: the state
    stays finite."""
    c = np.float32(averaging_constant)
    plain = old + unfused_multiply(c, batch - old)
    convex = (np.float32(1) - c) * old + c * batch
    convex = jnp.clip(convex, jnp.minimum(old, batch), jnp.maximum(old, batch))
    return jnp.where(jnp.isfinite(batch - old), plain, convex)


def _merge_moving_average(state: MinMaxState, lo: jnp.ndarray, hi: jnp.ndarray, c: float) -> MinMaxState:
    """First finite batch sets the range; later ones move it by ``c``; entries without finite data stay."""
    unobserved = (state.min_val == jnp.inf) & (state.max_val == -jnp.inf)
    has_data = lo <= hi
    new_min = jnp.where(unobserved, lo, _moving_average(state.min_val, lo, c))
    new_max = jnp.where(unobserved, hi, _moving_average(state.max_val, hi, c))
    return MinMaxState(jnp.where(has_data, new_min, state.min_val), jnp.where(has_data, new_max, state.max_val))


def _check_averaging_constant(owner: str, averaging_constant: float) -> None:
    if not 0.0 < float(averaging_constant) <= 1.0:
        raise ValueError(f"{owner}: averaging_constant must be in (0, 1], got {averaging_constant!r}")


@dataclasses.dataclass(frozen=True)
class MinMaxObserver(UniformObserverMixin):
    """Running min/max of everything observed (torch ``MinMaxObserver``); per-tensor qschemes only."""

    dtype: Any = "quint8"
    qscheme: str = "per_tensor_affine"
    reduce_range: bool = False
    quant_min: int | None = None
    quant_max: int | None = None
    eps: float = FLOAT32_EPS
    is_dynamic: bool = False

    _granularity = "per_tensor"

    def init(self, x: Any = None) -> MinMaxState:
        """Empty state (nothing observed). ``x`` is accepted for a uniform API; its shape is not needed."""
        return empty_minmax_state(())

    def update(self, state: MinMaxState, x: Any) -> MinMaxState:
        """Widen the range to the finite min/max of ``x``."""
        lo, hi = finite_aminmax(real_input(x, type(self).__name__))
        return MinMaxState(jnp.minimum(state.min_val, lo), jnp.maximum(state.max_val, hi))

    def merge(self, state: MinMaxState, axis_names: Any, previous: MinMaxState | None = None) -> MinMaxState:
        """Combine per-shard states inside ``shard_map``: ``pmin``/``pmax`` over ``axis_names``; exactly the
        state of observing the whole (unsharded) batch."""
        return merge_minmax(state, axis_names)

    def calculate_qparams(self, state: MinMaxState) -> tuple[jnp.ndarray, jnp.ndarray]:
        """``(scale, zero_point)`` from the observed range; ``(1.0, 0)`` when nothing was observed."""
        return self.qparams_from_range(state.min_val, state.max_val)


@dataclasses.dataclass(frozen=True)
class MovingAverageMinMaxObserver(UniformObserverMixin):
    """Moving average of per-batch min/max (torch ``MovingAverageMinMaxObserver``).

    The first batch with finite values sets the range; afterwards ``m += averaging_constant * (batch_m - m)``.
    """

    averaging_constant: float = 0.01
    dtype: Any = "quint8"
    qscheme: str = "per_tensor_affine"
    reduce_range: bool = False
    quant_min: int | None = None
    quant_max: int | None = None
    eps: float = FLOAT32_EPS
    is_dynamic: bool = False

    _granularity = "per_tensor"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _check_averaging_constant(owner, self.averaging_constant)
        if self.is_dynamic and self.averaging_constant != 1:
            raise ValueError(f"{owner}: is_dynamic=True needs averaging_constant=1 (as in torch)")
        object.__setattr__(self, "averaging_constant", float(self.averaging_constant))
        self._validate_uniform()

    def init(self, x: Any = None) -> MinMaxState:
        """Empty state (nothing observed)."""
        return empty_minmax_state(())

    def update(self, state: MinMaxState, x: Any) -> MinMaxState:
        lo, hi = finite_aminmax(real_input(x, type(self).__name__))
        return _merge_moving_average(state, lo, hi, self.averaging_constant)

    def merge(self, state: MinMaxState, axis_names: Any, previous: MinMaxState | None = None) -> MinMaxState:
        """Combine per-shard states (each shard moved the shared previous state toward its own block's range)
        with ``pmin``/``pmax``. Every rounding step of the average is monotone in the batch statistic, so this
        is exactly the unsharded update with the global batch min/max. A shard whose block holds no finite
        value keeps the previous state, which then takes part in the ``pmin``/``pmax``."""
        return merge_minmax(state, axis_names)

    def calculate_qparams(self, state: MinMaxState) -> tuple[jnp.ndarray, jnp.ndarray]:
        return self.qparams_from_range(state.min_val, state.max_val)


class _PerChannelMethods(UniformObserverMixin):
    """init / update / calculate_qparams shared by the per-channel observers (fields live in subclasses)."""

    _granularity = "per_channel"

    def __post_init__(self) -> None:
        if self.is_dynamic:
            raise ValueError(f"{type(self).__name__}: is_dynamic=True is not supported (as in torch)")
        object.__setattr__(self, "ch_axis", int(self.ch_axis))
        self._validate_uniform()

    def init(self, x: Any) -> MinMaxState:
        """Empty state with one entry per channel of ``x`` along ``ch_axis``."""
        shape = tuple(jnp.shape(x))
        axis = normalize_ch_axis(self.ch_axis, shape, type(self).__name__)
        return empty_minmax_state((shape[axis],))

    def _batch_range(self, state: MinMaxState, x: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
        x = real_input(x, type(self).__name__)
        axis = check_channels(state.min_val.shape[-1], x.shape, self.ch_axis, type(self).__name__)
        return finite_aminmax(x, channel_reduce_axes(x.ndim, axis))

    def update(self, state: MinMaxState, x: Any) -> MinMaxState:
        """Widen each channel's range to the finite min/max of that channel of ``x``."""
        lo, hi = self._batch_range(state, x)
        return MinMaxState(jnp.minimum(state.min_val, lo), jnp.maximum(state.max_val, hi))

    def merge(self, state: MinMaxState, axis_names: Any, previous: MinMaxState | None = None) -> MinMaxState:
        """Combine per-shard states inside ``shard_map`` (channel axis not split): per-channel ``pmin``/``pmax``;
        for the moving-average variant see ``MovingAverageMinMaxObserver.merge`` (same rule, same exactness)."""
        return merge_minmax(state, axis_names)

    def calculate_qparams(self, state: MinMaxState) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Per-channel ``(scale, zero_point)``, each of shape ``(channels,)``."""
        return self.qparams_from_range(state.min_val, state.max_val)


@dataclasses.dataclass(frozen=True)
class PerChannelMinMaxObserver(_PerChannelMethods):
    """Running min/max per channel (torch ``PerChannelMinMaxObserver``).

    Reduces over every axis except ``ch_axis`` (negative axes count from the end; checked by ``init``).
    """

    ch_axis: int = 0
    dtype: Any = "quint8"
    qscheme: str = "per_channel_affine"
    reduce_range: bool = False
    quant_min: int | None = None
    quant_max: int | None = None
    eps: float = FLOAT32_EPS
    is_dynamic: bool = False


@dataclasses.dataclass(frozen=True)
class MovingAveragePerChannelMinMaxObserver(_PerChannelMethods):
    """Moving average of per-channel min/max (torch ``MovingAveragePerChannelMinMaxObserver``).

    A channel's first finite batch sets its range; afterwards ``m += averaging_constant * (batch_m - m)``.
    """

    averaging_constant: float = 0.01
    ch_axis: int = 0
    dtype: Any = "quint8"
    qscheme: str = "per_channel_affine"
    reduce_range: bool = False
    quant_min: int | None = None
    quant_max: int | None = None
    eps: float = FLOAT32_EPS
    is_dynamic: bool = False

    def __post_init__(self) -> None:
        _check_averaging_constant(type(self).__name__, self.averaging_constant)
        object.__setattr__(self, "averaging_constant", float(self.averaging_constant))
        super().__post_init__()

    def update(self, state: MinMaxState, x: Any) -> MinMaxState:
        lo, hi = self._batch_range(state, x)
        return _merge_moving_average(state, lo, hi, self.averaging_constant)
