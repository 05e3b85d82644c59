"""PercentileObserver: clip outliers at a percentile of the observed values (absmax at percentile=100)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jquant.numerics.qparams import FLOAT32_EPS
from jquant.numerics.qschemes import is_per_channel, is_symmetric
from jquant.observers._base import (
    MinMaxState,
    UniformObserverMixin,
    channel_reduce_axes,
    check_channels,
    empty_minmax_state,
    merge_minmax,
    normalize_ch_axis,
    real_input,
)


@dataclasses.dataclass(frozen=True)
class PercentileObserver(UniformObserverMixin):
    """Range from a percentile of each batch, the widest over batches.

    Symmetric qschemes (default) use the ``percentile``-th percentile of ``|x|`` as the absolute maximum;
    affine ones use the ``(100 - percentile)``-th and ``percentile``-th percentiles of ``x``. Percentiles are
    numpy's default (linear interpolation). Per-channel qschemes reduce over every axis except ``ch_axis``.
    Across batches the state keeps the smallest low / largest high end seen (like MinMaxObserver), so
    ``percentile=100`` is an absmax (symmetric) or min/max (affine) observer.
    Non-finite rule: NaN and +-inf are ignored; a batch (channel) without finite values changes nothing.
    """

    percentile: float = 99.99
    ch_axis: int = 0
    dtype: Any = "qint8"
    qscheme: str = "per_tensor_symmetric"
    reduce_range: bool = False
    quant_min: int | None = None
    quant_max: int | None = None
    eps: float = FLOAT32_EPS

    def __post_init__(self) -> None:
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"PercentileObserver: percentile must be in (0, 100], got {self.percentile!r}")
        object.__setattr__(self, "percentile", float(self.percentile))
        object.__setattr__(self, "ch_axis", int(self.ch_axis))
        self._validate_uniform()

    @property
    def per_channel(self) -> bool:
        return is_per_channel(self.qscheme)

    def init(self, x: Any = None) -> MinMaxState:
        """Empty state; per-channel qschemes need ``x`` for the number of channels."""
        if not self.per_channel:
            return empty_minmax_state(())
        if x is None:
            raise ValueError("PercentileObserver.init: a per-channel qscheme needs an example input x")
        shape = tuple(jnp.shape(x))
        return empty_minmax_state((shape[normalize_ch_axis(self.ch_axis, shape, "PercentileObserver")],))

    def _batch_range(self, state: MinMaxState, x: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
        x = real_input(x, "PercentileObserver").astype(jnp.float32)
        axes = None
        if self.per_channel:
            axis = check_channels(state.min_val.shape[-1], x.shape, self.ch_axis, "PercentileObserver")
            axes = channel_reduce_axes(x.ndim, axis)
        x = jnp.where(jnp.isfinite(x), x, jnp.nan)  # nan-percentiles skip non-finite values
        if x.size == 0:
            return jnp.full(state.min_val.shape, jnp.inf), jnp.full(state.max_val.shape, -jnp.inf)
        if is_symmetric(self.qscheme):
            hi = jnp.nanpercentile(jnp.abs(x), self.percentile, axis=axes)
            lo = -hi
        else:
            lo = jnp.nanpercentile(x, 100.0 - self.percentile, axis=axes)
            hi = jnp.nanpercentile(x, self.percentile, axis=axes)
        has_data = ~jnp.isnan(hi)
        return jnp.where(has_data, lo, jnp.inf), jnp.where(has_data, hi, -jnp.inf)

    def update(self, state: MinMaxState, x: Any) -> MinMaxState:
        lo, hi = self._batch_range(state, x)
        return MinMaxState(jnp.minimum(state.min_val, lo), jnp.maximum(state.max_val, hi))

    def merge(self, state: MinMaxState, axis_names: Any, previous: MinMaxState | None = None) -> MinMaxState:
        """Combine per-shard states inside ``shard_map`` with ``pmin``/``pmax``: the result is the state of
        observing each shard's block as a separate batch (the widest of the per-block ranges), not the percentile of
        the whole batch; the two agree when the blocks are statistically alike."""
        return merge_minmax(state, axis_names)

    def calculate_qparams(self, state: MinMaxState) -> tuple[jnp.ndarray, jnp.ndarray]:
        return self.qparams_from_range(state.min_val, state.max_val)
