"""What runs after the int32 accumulation of a quantized conv / dot: float bias, ReLU, requantization.

The same ``Epilogue`` drives the native GEMM (fused into its store loop) and the XLA path (elementwise ops that
XLA fuses into one pass after the accumulation), so both round alike: ``y = acc * (x_scale * w_scale) + bias``,
``max(y, 0)`` when ``relu``, then ``clip(round(y * (1 / out_scale)) + out_zero_point, qmin, qmax)`` as uint8 /
int8 storage when ``out_scale`` is given (torch's requantization of a quantized conv / linear output).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from jquant.numerics.affine import reciprocal, round_to_grid
from jquant.numerics.qtypes import qrange, storage_dtype

NATIVE_OUT_STORAGE = (jnp.dtype(jnp.uint8), jnp.dtype(jnp.int8))


def requantize(y: jnp.ndarray, out_scale: Any, out_zero_point: Any, out_dtype: Any,
               quant_min: int | None = None, quant_max: int | None = None) -> jnp.ndarray:
    """Float ``y`` quantized per tensor with ``out_scale`` / ``out_zero_point`` into ``out_dtype`` storage."""
    qmin, qmax = qrange(out_dtype, quant_min, quant_max)
    zp = jnp.asarray(out_zero_point, jnp.int32)
    q = round_to_grid(y, reciprocal(jnp.asarray(out_scale, jnp.float32)), zp)
    return jnp.clip(q, qmin, qmax).astype(storage_dtype(out_dtype))


class Epilogue(NamedTuple):
    """The epilogue of a quantized conv / dot (see module docstring). ``bias``: float32, one value per output
    feature (the last axis of the channels-last result); ``out_scale`` None keeps a float32 output."""

    bias: Any = None
    relu: bool = False
    out_scale: Any = None
    out_zero_point: Any = 0
    out_dtype: Any = "uint8"
    out_quant_min: int | None = None
    out_quant_max: int | None = None

    @property
    def quantized(self) -> bool:
        return self.out_scale is not None

    @property
    def native_out(self) -> bool:
        """Whether the native GEMM can store this output itself (float32, uint8 or int8)."""
        return not self.quantized or jnp.dtype(storage_dtype(self.out_dtype)) in NATIVE_OUT_STORAGE

    def native_kwargs(self) -> dict:
        """``out`` / requantization keywords of ``native.gemm_s8`` (bias and relu passed separately)."""
        if not self.quantized:
            return {"out": "float32"}
        qmin, qmax = qrange(self.out_dtype, self.out_quant_min, self.out_quant_max)
        return {"out": str(jnp.dtype(storage_dtype(self.out_dtype))), "qmin": qmin, "qmax": qmax,
                "out_inv_scale": reciprocal(jnp.asarray(self.out_scale, jnp.float32)).reshape(()),
                "out_zero_point": self.out_zero_point}

    def apply(self, y: jnp.ndarray, *, with_bias: bool = True) -> jnp.ndarray:
        """The epilogue on a float32 result in XLA (``with_bias=False``: the bias was added already)."""
        if with_bias and self.bias is not None:
            y = y + jnp.asarray(self.bias, jnp.float32)
        if self.relu:
            y = jnp.maximum(y, 0.0)
        if self.quantized:
            return requantize(y, self.out_scale, self.out_zero_point, self.out_dtype, self.out_quant_min,
                              self.out_quant_max)
        return y
