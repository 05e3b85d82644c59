"""What every range observer shares: validated torch-style configuration and finite-only reductions.

Non-finite rule (all observers): NaN and +-inf values are ignored when statistics are gathered. A batch
without any finite value (or an empty batch) leaves the state unchanged, so a state never becomes NaN/inf
except for the "nothing observed yet" marker ``min=+inf, max=-inf`` (also for finite ranges as wide as
+-3.4e38, whose width overflows float32). Complex inputs are refused (their imaginary part would be lost).

Sharded observation: every observer has ``merge(state, axis_names, previous=None) -> state``, called inside
``shard_map`` (or ``pmap``) after each shard updated ``previous`` (the replicated state all shards started
from) with its own block: it combines the per-shard states with collectives over ``axis_names`` so that every
shard ends with the same state. Per-channel observers assume the channel axis is not split across shards.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.numerics.qparams import choose_qparams
from jquant.numerics.qschemes import canonical_qscheme, is_per_channel, is_symmetric
from jquant.numerics.qtypes import canonical_dtype, is_float_qtype, qrange


class MinMaxState(NamedTuple):
    """Running range. Scalars for per-tensor observers, shape ``(channels,)`` for per-channel ones.

    ``min_val=+inf, max_val=-inf`` marks entries that have not observed any finite value.
    """

    min_val: jnp.ndarray
    max_val: jnp.ndarray


def empty_minmax_state(shape: tuple[int, ...] = ()) -> MinMaxState:
    """A state that has observed nothing (``min=+inf, max=-inf``)."""
    return MinMaxState(jnp.full(shape, jnp.inf, jnp.float32), jnp.full(shape, -jnp.inf, jnp.float32))


def real_input(x: Any, owner: str) -> jnp.ndarray:
    """``x`` as an array after refusing complex dtypes (casting would silently drop the imaginary part)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(
            f"{owner}: got a complex input (dtype {x.dtype}); observers take real values. Observe the real "
            "and imaginary parts separately (jnp.real(x), jnp.imag(x)) or their magnitude (jnp.abs(x))"
        )
    return x


def merge_minmax(state: MinMaxState, axis_names: Any) -> MinMaxState:
    """Global range of per-shard ranges: ``pmin`` of the minimums, ``pmax`` of the maximums."""
    return MinMaxState(lax.pmin(state.min_val, axis_names), lax.pmax(state.max_val, axis_names))


def _masked_aminmax(x: jnp.ndarray, axis) -> tuple[jnp.ndarray, jnp.ndarray]:
    finite = jnp.isfinite(x)
    lo = jnp.min(x, axis=axis, initial=jnp.inf, where=finite)
    hi = jnp.max(x, axis=axis, initial=-jnp.inf, where=finite)
    return lo, hi


def _minmax_finite_rows(x: jnp.ndarray, axes: tuple[int, ...]):
    """Min, max and "all finite" of ``x`` over trailing ``axes`` in ONE pass (a variadic reduce, which XLA:CPU
    fuses with the op producing ``x``)."""

    def combine(a, b):
        return lax.min(a[0], b[0]), lax.max(a[1], b[1]), lax.bitwise_and(a[2], b[2])

    init = (np.float32(np.inf), np.float32(-np.inf), np.bool_(True))
    lo, hi, finite = lax.reduce((x, x, jnp.isfinite(x)), init, combine, axes)
    return lo, hi, jnp.all(finite)


def finite_aminmax(x: jnp.ndarray, axis: int | tuple[int, ...] | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Min and max over the finite entries of ``x`` (float32); ``(+inf, -inf)`` where there are none.

    Fast path when every entry is finite (the plain min and max are then the answer, bit for bit):
    - reducing trailing axes (per tensor, or per channel on a leading axis): one fused variadic reduce computing
      min, max and "all finite" together;
    - otherwise (e.g. per output channel of a ``(in, out)`` kernel, a column reduction, which XLA:CPU's own loop
      emitter runs ~10x slower): its YNNPACK min and max, guarded by a finite sum (a NaN or inf makes the sum
      NaN / inf). The plain min / max cannot be the guard: those kernels do not propagate NaN and may drop finite
      values next to one.
    Only when that check fails (or the sum overflows) the masked reductions run, which first write a filtered
    copy of ``x`` for each of min and max (two more passes over every observed tensor on every QAT step).
    """
    x = jnp.asarray(x, jnp.float32)
    if x.size == 0:
        return _masked_aminmax(x, axis)
    axes = tuple(range(x.ndim)) if axis is None else tuple(sorted(a % x.ndim for a in np.atleast_1d(axis)))
    if axes == tuple(range(x.ndim - len(axes), x.ndim)):
        lo, hi, all_finite = _minmax_finite_rows(x, axes)
    else:
        lo, hi, all_finite = jnp.min(x, axis=axes), jnp.max(x, axis=axes), jnp.isfinite(jnp.sum(x))
    return lax.cond(all_finite, lambda v: (lo, hi), lambda v: _masked_aminmax(v, axes), x)


def channel_reduce_axes(ndim: int, ch_axis: int) -> tuple[int, ...]:
    """Every axis except the (already normalized) channel axis."""
    return tuple(a for a in range(ndim) if a != ch_axis)


def normalize_ch_axis(ch_axis: int, shape: tuple[int, ...], owner: str) -> int:
    """``ch_axis`` as a non-negative axis of ``shape``, or a ValueError naming the shape."""
    ndim = len(shape)
    if not -ndim <= ch_axis < ndim:
        raise ValueError(
            f"{owner}: ch_axis={ch_axis} is out of range for an input of shape {tuple(shape)} "
            f"(ndim={ndim}); use an axis in [{-ndim}, {ndim - 1}]"
        )
    return ch_axis % ndim


def check_channels(state_channels: int, x_shape: tuple[int, ...], ch_axis: int, owner: str) -> int:
    """Normalized ch_axis of ``x``, after checking that ``x`` has as many channels as the state."""
    axis = normalize_ch_axis(ch_axis, x_shape, owner)
    if x_shape[axis] != state_channels:
        raise ValueError(
            f"{owner}: input of shape {tuple(x_shape)} has {x_shape[axis]} channels on ch_axis={ch_axis}, "
            f"but the state was initialized for {state_channels}"
        )
    return axis


class UniformObserverMixin:
    """Validation and qparams for the dtype / qscheme / range fields of torch-style observers.

    Subclasses are frozen dataclasses declaring ``dtype, qscheme, reduce_range, quant_min, quant_max, eps``
    (in torch's argument order for that class). ``dtype`` and ``qscheme`` accept torch names (``"quint8"``,
    ``"torch.qint8"``, ``"per_tensor_affine"``) and are stored canonically (``"uint8"``, ``"int8"``), so
    equal configurations compare and hash equal.
    """

    # Subclasses narrow the accepted granularity: "per_tensor", "per_channel" or None (both).
    _granularity: str | None = None

    def __post_init__(self) -> None:
        self._validate_uniform()

    def _validate_uniform(self) -> None:
        owner = type(self).__name__
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "qscheme", canonical_qscheme(self.qscheme))
        if self._granularity == "per_tensor" and is_per_channel(self.qscheme):
            raise ValueError(
                f"{owner}: qscheme={self.qscheme!r} is per-channel; this observer takes per_tensor_affine or "
                "per_tensor_symmetric (use a per-channel observer instead)"
            )
        if self._granularity == "per_channel" and not is_per_channel(self.qscheme):
            raise ValueError(
                f"{owner}: qscheme={self.qscheme!r} is per-tensor; this observer takes per_channel_affine, "
                "per_channel_symmetric or per_channel_affine_float_qparams"
            )
        if (self.quant_min is None) != (self.quant_max is None):
            raise ValueError(f"{owner}: give both quant_min and quant_max or neither")
        if self.quant_min is not None:
            qmin, qmax = int(self.quant_min), int(self.quant_max)
            if not qmin <= 0 <= qmax:
                raise ValueError(
                    f"{owner}: the custom range quant_min={qmin}, quant_max={qmax} must include 0 (as in torch)"
                )
            object.__setattr__(self, "quant_min", qmin)
            object.__setattr__(self, "quant_max", qmax)
        if not is_float_qtype(self.dtype):
            try:
                qrange(self.dtype, self.quant_min, self.quant_max, self.reduce_range)
            except ValueError as err:
                raise ValueError(f"{owner}: {err}") from None
        if is_symmetric(self.qscheme) and self.reduce_range and self.dtype == "uint8":
            raise ValueError(f"{owner}: reduce_range=True is not supported for symmetric quint8 (as in torch)")
        if not float(self.eps) > 0:
            raise ValueError(f"{owner}: eps must be > 0, got {self.eps!r}")
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "reduce_range", bool(self.reduce_range))

    @property
    def effective_reduce_range(self) -> bool:
        """torch applies ``reduce_range`` to custom ranges and to the default int8/uint8 ranges only."""
        return self.reduce_range and (self.quant_min is not None or self.dtype in ("int8", "uint8"))

    @property
    def qrange(self) -> tuple[int, int]:
        """The effective ``(quant_min, quant_max)`` after ``reduce_range``, as torch computes it."""
        return qrange(self.dtype, self.quant_min, self.quant_max, self.effective_reduce_range)

    def qparams_from_range(self, min_val: jnp.ndarray, max_val: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """torch's ``_calculate_qparams`` on a range (elementwise); unobserved entries give ``(1.0, 0)``."""
        return choose_qparams(
            min_val,
            max_val,
            dtype=self.dtype,
            qscheme=self.qscheme,
            quant_min=self.quant_min,
            quant_max=self.quant_max,
            reduce_range=self.effective_reduce_range,
            eps=self.eps,
        )
