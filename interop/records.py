"""QuantizedTensor: a framework-neutral record of a torch quantized tensor (int data + qparams)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jquant.numerics.qschemes import canonical_qscheme, is_per_channel
from jquant.numerics.qtypes import canonical_dtype


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized tensor as torch stores it.

    ``data`` holds the integer representation (``int_repr()``: int8 for qint8, uint8 for quint8, int32 for
    qint32). ``scale``/``zero_point`` keep torch's storage precision so that a round trip is bit-exact:
    float64 scales and int64 zero points (float zero points for ``per_channel_affine_float_qparams``).
    ``axis`` is the per-channel axis, ``None`` for per-tensor schemes. ``dtype`` is the canonical jquant
    qtype name (``"int8"``, ``"uint8"``, ``"int32"``).
    """

    data: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    qscheme: str
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "qscheme", canonical_qscheme(self.qscheme))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if is_per_channel(self.qscheme):
            if self.axis is None or not -self.data.ndim <= self.axis < self.data.ndim:
                raise ValueError(f"axis: per-channel QuantizedTensor needs an axis of data {self.data.shape}")
            if self.scale.shape != (self.data.shape[self.axis],):
                raise ValueError(
                    f"scale: shape {self.scale.shape} does not match channel dim {self.data.shape[self.axis]}"
                )
        elif self.axis is not None:
            raise ValueError(f"axis: must be None for per-tensor qscheme {self.qscheme}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def dequantize(self) -> np.ndarray:
        """Float32 values ``(data - zero_point) * scale``, bit-exact with torch's ``dequantize``: torch
        computes per-tensor in float32 and per-channel in the float64 of the stored scales (measured)."""
        work = np.float32 if self.axis is None else np.float64
        q = self.data.astype(work)
        scale = self.scale.astype(work)
        zp = self.zero_point.astype(work)
        if self.axis is not None:
            bshape = [1] * self.data.ndim
            bshape[self.axis] = -1
            scale, zp = scale.reshape(bshape), zp.reshape(bshape)
        return ((q - zp) * scale).astype(np.float32)

    def equals(self, other: object) -> bool:
        """Exact equality of data, qparams (values and dtypes), axis, qscheme and dtype."""
        if not isinstance(other, QuantizedTensor):
            return False
        arrays = ((self.data, other.data), (self.scale, other.scale), (self.zero_point, other.zero_point))
        return (
            self.axis == other.axis
            and self.qscheme == other.qscheme
            and self.dtype == other.dtype
            and all(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b) for a, b in arrays)
        )
