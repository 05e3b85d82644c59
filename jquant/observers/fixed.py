"""Observers that do not learn a range: fixed qparams and the dynamic-quantization placeholder."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from jquant.numerics.qparams import FLOAT32_EPS, choose_qparams
from jquant.numerics.qschemes import canonical_qscheme, is_per_channel
from jquant.numerics.qtypes import canonical_dtype, is_float_qtype, qrange
from jquant.observers._base import MinMaxState, empty_minmax_state, finite_aminmax, merge_minmax, real_input


@dataclasses.dataclass(frozen=True)
class FixedQParamsObserver:
    """Always returns the given ``(scale, zero_point)`` (torch ``FixedQParamsObserver``, per-tensor only).

    Its state is an empty tuple; ``update`` observes nothing.
    """

    scale: float
    zero_point: int
    dtype: Any = "quint8"
    qscheme: str = "per_tensor_affine"
    quant_min: int = 0
    quant_max: int = 255
    is_dynamic: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.is_dynamic:
            raise ValueError(f"{owner}: is_dynamic=True is not supported (as in torch)")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "qscheme", canonical_qscheme(self.qscheme))
        if is_per_channel(self.qscheme):
            raise ValueError(f"{owner}: qscheme={self.qscheme!r}; only per-tensor qschemes are supported")
        scale = float(self.scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"{owner}: scale must be a finite number > 0, got {self.scale!r}")
        try:
            qmin, qmax = qrange(self.dtype, self.quant_min, self.quant_max)
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None
        if not qmin <= int(self.zero_point) <= qmax:
            raise ValueError(
                f"{owner}: zero_point={self.zero_point} lies outside [quant_min, quant_max]=[{qmin}, {qmax}]"
            )
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", int(self.zero_point))
        object.__setattr__(self, "quant_min", qmin)
        object.__setattr__(self, "quant_max", qmax)

    def init(self, x: Any = None) -> tuple:
        return ()

    def update(self, state: tuple, x: Any) -> tuple:
        return state

    def merge(self, state: tuple, axis_names: Any, previous: tuple | None = None) -> tuple:
        """Nothing to combine across shards: the qparams are fixed."""
        return state

    def calculate_qparams(self, state: tuple = ()) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The fixed ``(scale, zero_point)`` as float32 / int32 scalars."""
        return jnp.asarray(self.scale, jnp.float32), jnp.asarray(self.zero_point, jnp.int32)


_FLOAT_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
}


@dataclasses.dataclass(frozen=True)
class PlaceholderObserver:
    """Marks a tensor that is not calibrated ahead of time (torch ``PlaceholderObserver``).

    * Float ``dtype`` (default ``"float32"``; also ``"float16"``, ``"bfloat16"``): the tensor stays in
      floating point; ``calculate_qparams`` raises, as in torch.
    * Integer ``dtype`` with ``is_dynamic=True`` (dynamic quantization, e.g. ``dtype="quint8"``): qparams are
      computed at run time from the tensor itself. The state keeps only the min/max of the LAST batch
      (finite values only), so ``calculate_qparams(update(state, x))`` gives the qparams that dynamic
      quantization would use for ``x`` with the observer formula (``qscheme``, default per_tensor_affine);
      ``dynamic_qparams(x)`` does both steps. ``compute_dtype`` (deprecated in torch) implies ``is_dynamic``.
    """

    dtype: Any = "float32"
    custom_op_name: str = ""
    compute_dtype: Any = None
    quant_min: int | None = None
    quant_max: int | None = None
    qscheme: str | None = None
    eps: float | None = None
    is_dynamic: bool = False

    def __post_init__(self) -> None:
        name = str(self.dtype).removeprefix("torch.")
        if name in _FLOAT_DTYPES:
            object.__setattr__(self, "dtype", _FLOAT_DTYPES[name])
        else:
            try:
                object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
            except ValueError:
                raise ValueError(
                    f"PlaceholderObserver: unknown dtype {self.dtype!r}; use a float dtype "
                    f"({', '.join(sorted(set(_FLOAT_DTYPES.values())))}) or a quantized dtype"
                ) from None
        object.__setattr__(self, "qscheme", canonical_qscheme(self.qscheme or "per_tensor_affine"))
        object.__setattr__(self, "eps", FLOAT32_EPS if self.eps is None else float(self.eps))
        if self.compute_dtype is not None:
            object.__setattr__(self, "is_dynamic", True)
        if self.is_quantized:
            try:
                qrange(self.dtype, self.quant_min, self.quant_max)
            except ValueError as err:
                raise ValueError(f"PlaceholderObserver: {err}") from None

    @property
    def is_quantized(self) -> bool:
        """Whether ``dtype`` is an integer qtype (else the tensor stays in floating point)."""
        return self.dtype not in _FLOAT_DTYPES.values() and not is_float_qtype(self.dtype)

    def init(self, x: Any = None) -> MinMaxState:
        return empty_minmax_state(())

    def update(self, state: MinMaxState, x: Any) -> MinMaxState:
        """Remember the finite min/max of this batch only (a batch with none keeps the previous state)."""
        lo, hi = finite_aminmax(real_input(x, "PlaceholderObserver"))
        has_data = lo <= hi
        return MinMaxState(jnp.where(has_data, lo, state.min_val), jnp.where(has_data, hi, state.max_val))

    def merge(self, state: MinMaxState, axis_names: Any, previous: MinMaxState | None = None) -> MinMaxState:
        """Combine per-shard states inside ``shard_map``: ``pmin``/``pmax``, the min/max of the whole last
        batch (a shard whose block has no finite value contributes the previous state)."""
        return merge_minmax(state, axis_names)

    def calculate_qparams(self, state: MinMaxState) -> tuple[jnp.ndarray, jnp.ndarray]:
        """qparams of the last observed batch; raises for float dtypes, which have none."""
        if not self.is_quantized:
            raise ValueError(
                f"PlaceholderObserver(dtype={self.dtype!r}) has no qparams: the tensor stays in floating point"
            )
        return choose_qparams(
            state.min_val,
            state.max_val,
            dtype=self.dtype,
            qscheme=self.qscheme,
            quant_min=self.quant_min,
            quant_max=self.quant_max,
            eps=self.eps,
        )

    def dynamic_qparams(self, x: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The run-time qparams of ``x`` itself (dynamic quantization)."""
        return self.calculate_qparams(self.update(self.init(x), x))
