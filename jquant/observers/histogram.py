"""HistogramObserver: torch's running histogram and L2 range search, with a fixed-size pytree state.

The update (binning, re-binning when the range grows) runs in JAX and reproduces torch's float32 numbers
bit for bit, including ``torch.linspace``'s single-rounding (FMA) arithmetic. The range search in
``calculate_qparams`` mixes Python doubles and float32 tensors in torch; it runs on the host with the same
precisions (numpy) through ``jax.pure_callback``, so it still works under ``jit`` and ``vmap``. The searched range
(``min + bin_width * bin``) is computed there too: under ``jit`` XLA:CPU would fuse it into an FMA.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.numerics.exact import exact_divide, two_product, two_sum
from jquant.numerics.qparams import FLOAT32_EPS
from jquant.numerics.qtypes import is_float_qtype
from jquant.observers._base import UniformObserverMixin, finite_aminmax, real_input

_BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "uint16": 16, "int32": 32}


class HistogramState(NamedTuple):
    """``histogram`` (float32 counts over ``[min_val, max_val]`` in ``bins`` equal bins) and the range.

    ``min_val=+inf, max_val=-inf`` marks a state that has observed nothing.
    """

    histogram: jnp.ndarray
    min_val: jnp.ndarray
    max_val: jnp.ndarray


def _round_to_odd_sum(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """``a + b`` rounded to odd: exact sums stay, inexact ones take the neighbour with an odd last bit."""
    s, err = two_sum(a, b)
    even = (lax.bitcast_convert_type(s, jnp.int32) & 1) == 0
    toward = jnp.where(err > 0, jnp.float32(jnp.inf), jnp.float32(-jnp.inf))
    return jnp.where((err != 0) & even, jnp.nextafter(s, toward), s)


def fma_f32(a: jnp.ndarray, b: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    """Correctly rounded float32 ``a * b + c`` without an FMA instruction.

    The product is split exactly (Dekker), then the three-term sum is rounded once using the
    round-to-odd technique of Boldo and Melquiond.
    """
    p, p_err = two_product(a, b)
    hi, lo = two_sum(c, p)
    return hi + _round_to_odd_sum(lo, p_err)


def torch_linspace(start: jnp.ndarray, end: jnp.ndarray, steps: int) -> jnp.ndarray:
    """float32 ``torch.linspace(start, end, steps)`` bit for bit.

    torch's CPU kernel computes ``step = (end - start) / (steps - 1)`` in float32 and each point with a
    single rounding: ``start + step * i`` for the first half, ``end - step * (steps - 1 - i)`` after.
    """
    start = jnp.asarray(start, jnp.float32)
    end = jnp.asarray(end, jnp.float32)
    n = np.float32(steps - 1)
    width = end - start
    # A finite range whose width overflows float32 (+-3e38): halve the ends (exact) to get a finite step.
    step = jnp.where(
        jnp.isfinite(width), exact_divide(width, n), exact_divide(end * 0.5 - start * 0.5, n) * np.float32(2)
    )
    index = jnp.arange(steps, dtype=jnp.float32)
    # fma_f32 splits its factors (times 4097), which overflows for steps above ~8e34: plain arithmetic there.
    fusable = jnp.abs(step) < np.float32(2.0**100)
    lower = jnp.where(fusable, fma_f32(step, index, start), start + step * index)
    upper = jnp.where(fusable, fma_f32(-step, n - index, end), end - step * (n - index))
    return jnp.where(jnp.arange(steps) < steps // 2, lower, upper)


def _histc(x: jnp.ndarray, valid: jnp.ndarray, lo: jnp.ndarray, hi: jnp.ndarray, bins: int) -> jnp.ndarray:
    """``torch.histc(x[valid], bins, min=lo, max=hi)`` (CPU: bin = trunc((x - lo) * bins / (hi - lo)))."""
    same = lo == hi
    lo = jnp.where(same, lo - 1, lo)  # torch widens an empty range by 1 on both sides
    hi = jnp.where(same, hi + 1, hi)
    pos = exact_divide((x - lo) * np.float32(bins), jnp.broadcast_to(hi - lo, x.shape))
    # Where the torch formula overflows (ranges near +-3.4e38), take the ratio of halved differences first.
    wide = exact_divide(x * 0.5 - lo * 0.5, jnp.broadcast_to(hi * 0.5 - lo * 0.5, x.shape)) * np.float32(bins)
    pos = jnp.where(jnp.isfinite((x - lo) * np.float32(bins)) & jnp.isfinite(hi - lo), pos, wide)
    pos = jnp.clip(jnp.trunc(pos), 0, bins - 1).astype(jnp.int32)  # the last bin includes its right edge
    inside = valid & (x >= lo) & (x <= hi)
    return jnp.zeros(bins, jnp.float32).at[pos].add(inside.astype(jnp.float32))


def _safe_width(lo: jnp.ndarray, hi: jnp.ndarray, parts: int) -> jnp.ndarray:
    """``(hi - lo) / parts`` (torch's rounding); where ``hi - lo`` overflows float32, from the halved ends."""
    plain = exact_divide(hi - lo, np.float32(parts))
    wide = exact_divide(hi * 0.5 - lo * 0.5, np.float32(parts)) * np.float32(2)
    return jnp.where(jnp.isfinite(hi - lo), plain, wide)


def _upscale(hist, orig_min, orig_max, new_min, new_max, bins: int, upsample_rate: int) -> jnp.ndarray:
    """torch's re-binning: split each bin into ``upsample_rate`` parts, move each part's midpoint."""
    fine = bins * upsample_rate
    parts = exact_divide(jnp.repeat(hist, upsample_rate), np.float32(upsample_rate))
    part_width = _safe_width(orig_min, orig_max, fine)
    midpoints = torch_linspace(orig_min, orig_max, fine + 1)[:-1] + np.float32(0.5) * part_width
    edges = torch_linspace(new_min, new_max, bins + 1)
    bucket = jnp.clip(jnp.searchsorted(edges, midpoints, side="right") - 1, 0, bins - 1)
    return jnp.zeros(bins, jnp.float32).at[bucket].add(parts)


# --- host-side range search (torch's _non_linear_param_search / _compute_quantization_error) -------------

_F32 = np.float32


def _floor_divide(a: np.ndarray, b: np.float32) -> np.ndarray:
    """torch's float ``div(..., rounding_mode="floor")`` (Python semantics via fmod), for ``b > 0``."""
    mod = np.fmod(a, b)
    div = (a - mod) / b
    div = np.where((mod != 0) & (mod < 0), div - _F32(1), div)
    floor = np.floor(div)
    return np.where(div - floor > _F32(0.5), floor + _F32(1), floor).astype(_F32)


def _quantization_error(hist, bin_width: float, dst_nbins: int, start: int, end: int) -> float:
    """L2 error of quantizing the histogram into ``dst_nbins`` bins spanning bins ``start..end``."""
    bins = hist.shape[0]
    dst_width = bin_width * (end - start + 1) / dst_nbins  # Python doubles, as in torch
    if dst_width == 0.0:
        return 0.0
    width32, dst32, half32 = _F32(bin_width), _F32(dst_width), _F32(dst_width / 2)
    src_begin = (np.arange(bins) - start).astype(_F32) * width32
    src_end = src_begin + width32
    density = hist / width32

    def norm(delta_begin, delta_end):
        return density * ((delta_end * delta_end * delta_end - delta_begin * delta_begin * delta_begin) / _F32(3))

    dst_of_begin = np.clip(_floor_divide(src_begin, dst32), 0, dst_nbins - 1).astype(_F32)
    dst_of_end = np.clip(_floor_divide(src_end, dst32), 0, dst_nbins - 1).astype(_F32)
    total = norm(src_begin - (dst_of_begin + _F32(0.5)) * dst32, np.full(bins, half32))
    total = total + (dst_of_end - dst_of_begin - _F32(1)) * norm(-half32, half32)
    total = total + norm(-half32, src_end - (dst_of_end * dst32 + half32))
    return float(total.sum(dtype=_F32))


def _search_bins(hist: np.ndarray, min_val: np.ndarray, max_val: np.ndarray, *, dst_nbins: int) -> tuple:
    """torch's greedy search for the [start_bin, end_bin] window with the least L2 error."""
    hist = np.asarray(hist, _F32)
    bins = hist.shape[0]
    min_val, max_val = float(min_val), float(max_val)
    if not (np.isfinite(min_val) and np.isfinite(max_val)):
        return np.int32(0), np.int32(bins - 1)
    bin_width = (max_val - min_val) / bins
    if bin_width > 2.0**60:
        # The float32 error terms (width**3) would overflow to inf/NaN and the search would run to the end;
        # the chosen window does not depend on the unit, so measure the width in units of 2**k (exact).
        bin_width = float(np.ldexp(bin_width, -int(np.frexp(bin_width)[1])))
    total = float(hist.sum(dtype=_F32))
    cumulative = np.cumsum(hist, dtype=np.float64).astype(_F32).tolist()  # torch accumulates cumsum in double
    alpha, beta, step = 0.0, 1.0, 1e-5
    start, end = 0, bins - 1
    norm_min = float("inf")
    while alpha < beta:
        next_alpha, next_beta = alpha + step, beta - step
        # Thresholds are Python doubles compared against float32 tensors: torch rounds them to float32.
        left = max(start, bisect.bisect_left(cumulative, float(_F32(next_alpha * total))))
        left = min(left, end)
        right = min(end, bisect.bisect_right(cumulative, float(_F32(next_beta * total))) - 1)
        right = max(right, start)
        next_start, next_end = start, end
        if left - start > end - right:
            next_start, alpha = left, next_alpha
        else:
            next_end, beta = right, next_beta
        if next_start == start and next_end == end:
            continue
        norm = _quantization_error(hist, bin_width, dst_nbins, next_start, next_end)
        if norm > norm_min:
            break
        norm_min, start, end = norm, next_start, next_end
    return np.int32(start), np.int32(end)


def _searched_range(hist: np.ndarray, min_val: np.ndarray, max_val: np.ndarray, *, bins: int, dst_nbins: int):
    """torch's ``new_min = min_val + bin_width * start_bin`` and ``new_max = min_val + bin_width * (end_bin + 1)``
    for the searched window, in float32 with a rounding after every operation (as torch's float32 tensors).

    It runs on the host, in numpy, on purpose: XLA:CPU drops ``optimization_barrier`` before fusion and its
    fused loops contract ``a + b * c`` into an FMA, so the jitted range was one ulp off torch's (measured on
    jax 0.10.2: 642 of 2,000 random ranges). numpy rounds each ufunc's result, whatever calls it.
    """
    start, end = _search_bins(hist, min_val, max_val, dst_nbins=dst_nbins)
    lo, hi = _F32(min_val), _F32(max_val)
    first, last = _F32(start), _F32(end + 1)
    with np.errstate(over="ignore", invalid="ignore"):  # empty states (+inf, -inf) are replaced by the caller
        if np.isfinite(hi - lo) or not (np.isfinite(lo) and np.isfinite(hi)):
            bin_width = (hi - lo) / _F32(bins)
            return _F32(lo + bin_width * first), _F32(lo + bin_width * last)
        # A finite range whose width overflows float32 (+-3e38): step twice by half the offset, stay inside.
        half = (hi * _F32(0.5) - lo * _F32(0.5)) / _F32(bins)
        new_min = lo + half * first + half * first
        new_max = lo + half * last + half * last
        return _F32(np.clip(new_min, lo, hi)), _F32(np.clip(new_max, lo, hi))


@dataclasses.dataclass(frozen=True)
class HistogramObserver(UniformObserverMixin):
    """torch ``HistogramObserver``: a running histogram and torch's L2 search for the clipping range.

    Non-finite rule: NaN and +-inf values are dropped before binning (torch drops +-inf only); a batch with
    no finite value leaves the state unchanged. ``upsample_rate`` is torch's fixed re-binning factor.
    """

    bins: int = 2048
    dtype: Any = "quint8"
    qscheme: str = "per_tensor_affine"
    reduce_range: bool = False
    quant_min: int | None = None
    quant_max: int | None = None
    eps: float = FLOAT32_EPS
    is_dynamic: bool = False
    upsample_rate: int = 16

    _granularity = "per_tensor"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.is_dynamic:
            raise ValueError(f"{owner}: is_dynamic=True is not supported (as in torch)")
        for name in ("bins", "upsample_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
        self._validate_uniform()
        if is_float_qtype(self.dtype):
            raise ValueError(f"{owner}: dtype={self.dtype!r} is a float qtype; use an integer qtype")

    @property
    def dst_nbins(self) -> int:
        """Number of quantization levels the search assumes: ``2 ** bits(dtype)`` (as torch)."""
        return 2 ** _BITS[self.dtype]

    def init(self, x: Any = None) -> HistogramState:
        """Empty state: zero histogram, ``min=+inf, max=-inf``."""
        return HistogramState(
            jnp.zeros(self.bins, jnp.float32), jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(-jnp.inf, jnp.float32)
        )

    def _carry(self, hist, cur_min, cur_max, new_min, new_max) -> jnp.ndarray:
        """``hist`` (over ``[cur_min, cur_max]``) re-binned onto ``[new_min, new_max]`` as torch does when the
        range grows: unchanged for the same range, exactly for a point mass, else upsampled; 0 when empty."""
        empty = (cur_min == jnp.inf) | (cur_max == -jnp.inf)
        same_range = (new_min == cur_min) & (new_max == cur_max)
        point_mass = cur_min == cur_max  # the old histogram is one value: re-bin it exactly
        point_hist = _histc(cur_min[None], jnp.ones(1, bool), new_min, new_max, self.bins) * jnp.sum(hist)
        upscaled = _upscale(hist, cur_min, cur_max, new_min, new_max, self.bins, self.upsample_rate)
        moved = jnp.where(same_range, hist, jnp.where(point_mass, point_hist, upscaled))
        return jnp.where(empty, jnp.zeros_like(hist), moved)

    def update(self, state: HistogramState, x: Any) -> HistogramState:
        """Add the finite values of ``x``; re-bin the old histogram when the range grows."""
        x = jnp.ravel(real_input(x, type(self).__name__).astype(jnp.float32))
        finite = jnp.isfinite(x)
        x_min, x_max = finite_aminmax(x)
        cur_min, cur_max, hist = state.min_val, state.max_val, state.histogram
        empty = (cur_min == jnp.inf) | (cur_max == -jnp.inf)
        new_min = jnp.where(empty, x_min, jnp.minimum(cur_min, x_min))
        new_max = jnp.where(empty, x_max, jnp.maximum(cur_max, x_max))
        batch_hist = _histc(x, finite, new_min, new_max, self.bins)
        merged = batch_hist + self._carry(hist, cur_min, cur_max, new_min, new_max)
        has_data = x_min <= x_max
        return HistogramState(
            jnp.where(has_data, merged, hist),
            jnp.where(has_data, new_min, cur_min),
            jnp.where(has_data, new_max, cur_max),
        )

    def merge(
        self, state: HistogramState, axis_names: Any, previous: HistogramState | None = None
    ) -> HistogramState:
        """Combine per-shard states inside ``shard_map`` into the histogram of the whole batch.

        Each shard updated ``previous`` (the replicated state every shard started from; ``None``: nothing
        observed before) with its own block. The global range is the ``pmin``/``pmax`` of the shard ranges;
        each shard's own counts (its histogram minus the re-binned ``previous``) are re-binned onto the global
        range and summed with ``psum``; ``previous`` is re-binned onto it once. Counts are conserved exactly.
        When every shard saw the global range the result equals the unsharded update; otherwise a shard's
        counts move by at most one bin of the global histogram (the usual re-binning error).
        """
        if previous is None:
            previous = self.init()
        lo = lax.pmin(state.min_val, axis_names)
        hi = lax.pmax(state.max_val, axis_names)
        prev_here = self._carry(previous.histogram, previous.min_val, previous.max_val, state.min_val, state.max_val)
        own = self._carry(state.histogram - prev_here, state.min_val, state.max_val, lo, hi)
        base = self._carry(previous.histogram, previous.min_val, previous.max_val, lo, hi)
        return HistogramState(base + lax.psum(own, axis_names), lo, hi)

    def search_range(self, state: HistogramState) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The clipping range ``(new_min, new_max)`` chosen by torch's L2 search (``+inf, -inf`` if empty).

        The range is computed on the host with the search (:func:`_searched_range`): in XLA, ``min + width *
        bin`` under ``jit`` is fused into one FMA (one rounding where torch rounds the product first, 1 ulp off).
        """
        result = (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
        search = lambda h, lo, hi: _searched_range(h, lo, hi, bins=self.bins, dst_nbins=self.dst_nbins)
        new_min, new_max = jax.pure_callback(
            search, result, state.histogram, state.min_val, state.max_val, vmap_method="sequential"
        )
        empty = (state.min_val == jnp.inf) & (state.max_val == -jnp.inf)
        return jnp.where(empty, jnp.inf, new_min), jnp.where(empty, -jnp.inf, new_max)

    def calculate_qparams(self, state: HistogramState) -> tuple[jnp.ndarray, jnp.ndarray]:
        """``(scale, zero_point)`` of the searched range; ``(1.0, 0)`` when nothing was observed."""
        return self.qparams_from_range(*self.search_range(state))
