"""MSEObserver: choose the clipping range with the least quantization error (meant for weights)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.numerics.qparams import FLOAT32_EPS
from jquant.numerics.qschemes import is_per_channel
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


@dataclasses.dataclass(frozen=True)
class MSEObserver(UniformObserverMixin):
    """Grid search over shrunken ranges ``[r * min, r * max]`` for the least ``sum |fq(x) - x| ** norm``.

    The ``num_candidates`` ratios ``r`` are evenly spaced in ``[min_ratio, 1]`` (``r = 1`` is the plain
    min/max range, so the result is never worse than MinMax on the observed data). The error is measured
    by fake-quantizing ``x`` with each candidate's qparams; per-channel qschemes pick one ratio per channel
    (reducing over every axis except ``ch_axis``). On ties the larger range wins.
    Meant for weights (one ``update``); after several updates the state is the widest of the ranges chosen
    per batch. Non-finite rule: NaN and +-inf are ignored (not part of the range nor of the error); a batch
    (channel) without finite values changes nothing.
    """

    num_candidates: int = 100
    min_ratio: float = 0.2
    norm: float = 2.0
    ch_axis: int = 0
    dtype: Any = "qint8"
    qscheme: str = "per_channel_symmetric"
    reduce_range: bool = False
    quant_min: int | None = None
    quant_max: int | None = None
    eps: float = FLOAT32_EPS

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if (
            isinstance(self.num_candidates, bool)
            or not isinstance(self.num_candidates, int | np.integer)
            or (self.num_candidates < 1)
        ):
            raise ValueError(f"{owner}: num_candidates must be a positive integer, got {self.num_candidates!r}")
        if not 0.0 < float(self.min_ratio) <= 1.0:
            raise ValueError(f"{owner}: min_ratio must be in (0, 1], got {self.min_ratio!r}")
        if not float(self.norm) > 0:
            raise ValueError(f"{owner}: norm must be > 0, got {self.norm!r}")
        if self.qscheme == "per_channel_affine_float_qparams":
            raise ValueError(f"{owner}: qscheme per_channel_affine_float_qparams is not supported")
        object.__setattr__(self, "ch_axis", int(self.ch_axis))
        self._validate_uniform()

    @property
    def per_channel(self) -> bool:
        return is_per_channel(self.qscheme)

    def ratios(self) -> np.ndarray:
        """The candidate shrink ratios, ascending, ending at 1."""
        return np.linspace(self.min_ratio, 1.0, self.num_candidates, dtype=np.float32)

    def init(self, x: Any = None) -> MinMaxState:
        """Empty state; per-channel qschemes need ``x`` for the number of channels."""
        if not self.per_channel:
            return empty_minmax_state(())
        if x is None:
            raise ValueError("MSEObserver.init: a per-channel qscheme needs an example input x")
        shape = tuple(jnp.shape(x))
        return empty_minmax_state((shape[normalize_ch_axis(self.ch_axis, shape, "MSEObserver")],))

    def quantization_error(self, x: Any, min_val: jnp.ndarray, max_val: jnp.ndarray, axis: int | None = None):
        """``sum |fq(x) - x| ** norm`` over finite values (per channel along ``axis`` if given)."""
        x = jnp.asarray(x, jnp.float32)
        scale, zero_point = self.qparams_from_range(min_val, max_val)
        if axis is not None:
            shape = [1] * x.ndim
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        qmin, qmax = self.qrange
        q = jnp.clip(jnp.round(x * (1.0 / scale)) + zero_point, qmin, qmax)
        err = jnp.abs((q - zero_point) * scale - x) ** self.norm
        err = jnp.where(jnp.isfinite(x), err, 0.0)
        return jnp.sum(err, axis=None if axis is None else channel_reduce_axes(x.ndim, axis))

    def update(self, state: MinMaxState, x: Any) -> MinMaxState:
        """Search the best shrunken range of this batch and widen the state to it."""
        x = real_input(x, "MSEObserver").astype(jnp.float32)
        axis = None
        if self.per_channel:
            axis = check_channels(state.min_val.shape[-1], x.shape, self.ch_axis, "MSEObserver")
            lo, hi = finite_aminmax(x, channel_reduce_axes(x.ndim, axis))
        else:
            lo, hi = finite_aminmax(x)
        has_data = lo <= hi
        safe_lo, safe_hi = jnp.where(has_data, lo, 0.0), jnp.where(has_data, hi, 0.0)
        ratios = jnp.asarray(self.ratios())
        # One candidate at a time keeps memory at one copy of x (weights can be large).
        errors = jax.lax.map(lambda r: self.quantization_error(x, r * safe_lo, r * safe_hi, axis), ratios)
        # argmin over the reversed grid: on ties the larger ratio (less clipping) wins.
        best = ratios[::-1][jnp.argmin(errors[::-1], axis=0)]
        best_lo, best_hi = best * safe_lo, best * safe_hi
        return MinMaxState(
            jnp.where(has_data, jnp.minimum(state.min_val, best_lo), state.min_val),
            jnp.where(has_data, jnp.maximum(state.max_val, best_hi), state.max_val),
        )

    def merge(self, state: MinMaxState, axis_names: Any, previous: MinMaxState | None = None) -> MinMaxState:
        """Combine per-shard states inside ``shard_map`` with ``pmin``/``pmax``: the result is the state of
        observing each shard's block as a separate batch (the widest of the per-block ranges), not the
        error-minimizing range of the whole batch; the two agree when the blocks are statistically alike."""
        return merge_minmax(state, axis_names)

    def calculate_qparams(self, state: MinMaxState) -> tuple[jnp.ndarray, jnp.ndarray]:
        return self.qparams_from_range(state.min_val, state.max_val)
