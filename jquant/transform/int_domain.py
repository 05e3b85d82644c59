"""Integer values between the quantized ops of a converted function (torch's converted graph in JAX).

In a converted function every value quantized at some site (a conv / dense output observed after its ReLU, a
quantized add, a max-pool or reshape sharing its input's observer, a concatenate group) also exists as a
``QValue``: its uint8 / int8 integers and the qparams of the slot that quantized it. The interpreter still
carries the float value (``dequantize(qvalue)``, exactly the fake-quant value of ``mode="eval"``) for float ops and
the function's outputs; a consumer that can take the integers (a static W8A8 conv / dot quantized with the same
slot, a value-preserving op) reads them instead, so the float copy is dead code that XLA removes and the
buffers between quantized ops hold 8-bit integers, as in torch's ``convert_fx`` graph.

QValues are keyed by the jaxpr variable that carries the float value (one table per traced call).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from jquant.kernels.epilogue import requantize
from jquant.numerics.affine import dequantize_affine
from jquant.transform.specs import QuantizationSpec

# Primitives that map quantized integers to quantized integers with the same qparams, value for value (the
# quantization grid is monotone, so max-pool and ReLU commute with it; layout ops move values).
INTEGER_OPS = frozenset({
    "reshape", "transpose", "squeeze", "expand_dims", "reduce_window_max", "concatenate", "slice",
    "rev", "broadcast_in_dim", "copy",
})


class QParamsRef(NamedTuple):
    """Which slot quantized a value: ``(site name, role key)``, plus the integer range it was clamped to."""

    site: str
    key: str
    dtype: str
    quant_min: int | None
    quant_max: int | None


class QValue(NamedTuple):
    """Integers ``q`` of a quantized value and its per-tensor qparams (``ref`` names the slot)."""

    q: Any
    scale: Any
    zero_point: Any
    ref: QParamsRef

    def dequantize(self) -> jnp.ndarray:
        return dequantize_affine(self.q, self.scale, self.zero_point)


def integer_spec(spec: Any) -> bool:
    """Whether values quantized with ``spec`` can travel as integers (static, per tensor, uint8 / int8)."""
    return (isinstance(spec, QuantizationSpec) and not spec.is_dynamic and not spec.per_channel
            and spec.dtype in ("uint8", "int8") and spec.block_size is None)


def reference(site: str, key: str, spec: QuantizationSpec) -> QParamsRef:
    return QParamsRef(site, key, spec.dtype, spec.quant_min, spec.quant_max)


def quantize_value(y: jnp.ndarray, scale: Any, zero_point: Any, ref: QParamsRef) -> QValue:
    """``y`` quantized with per-tensor qparams (as the fake quant of ``eval`` rounds it)."""
    scale = jnp.asarray(scale, jnp.float32).reshape(())
    zero_point = jnp.round(jnp.asarray(zero_point)).astype(jnp.int32).reshape(())
    q = requantize(y.astype(jnp.float32), scale, zero_point, ref.dtype, ref.quant_min, ref.quant_max)
    return QValue(q, scale, zero_point, ref)


class Shadows:
    """The integer form of jaxpr variables in one traced call (``var -> QValue``)."""

    def __init__(self) -> None:
        self._values: dict[Any, QValue] = {}

    def get(self, var: Any, ref: QParamsRef | None = None) -> QValue | None:
        """The QValue of ``var`` (when ``ref`` is given: only if it was quantized with that slot and range)."""
        try:
            value = self._values.get(var)
        except TypeError:  # a Literal: never quantized
            return None
        if value is None or (ref is not None and value.ref != ref):
            return None
        return value

    def set(self, var: Any, value: QValue) -> jnp.ndarray:
        """Record ``value`` for ``var``; returns the float value the interpreter carries."""
        self._values[var] = value
        return value.dequantize()


# -- fused epilogues: conv / dense + bias add (+ ReLU) requantized in one kernel call ---------------------------


class FusedStep(NamedTuple):
    """A non-tail equation of a fused pattern (the bias add before a ReLU): the converted function routes it to
    its handler, which carries the anchor's pending epilogue through it. ``name``: the anchor site."""

    name: str
    primitive: str


class Pending(NamedTuple):
    """A static conv / dense whose requantized output waits for its pattern's tail (bias add, ReLU)."""

    site: Any
    eqn: Any
    x: Any  # the activation input as the kernel takes it (integers when they were available)
    bias: Any = None
    relu: bool = False


def producers(jaxpr: Any) -> dict:
    """``{var: eqn}`` over ``jaxpr`` and every sub-jaxpr (scan / cond / jit bodies)."""
    found: dict = {}
    stack = [jaxpr]
    while stack:
        current = stack.pop()
        current = getattr(current, "jaxpr", current)
        for eqn in current.eqns:
            for var in eqn.outvars:
                found[var] = eqn
            for value in eqn.params.values():
                for v in value if isinstance(value, tuple | list) else (value,):
                    if hasattr(v, "eqns") or hasattr(getattr(v, "jaxpr", None), "eqns"):
                        stack.append(v)
    return found


def channel_bias(add_eqn, y_var, invals: list, producers_map: dict) -> jnp.ndarray | None:
    """The per-channel vector of a bias add ``y + b`` over the last axis of ``y`` (None when ``b`` is not a
    broadcast of such a vector: the add then runs as it is)."""
    positions = [i for i, v in enumerate(add_eqn.invars) if v is y_var]
    if len(positions) != 1:
        return None
    other = 1 - positions[0]
    b_var, b = add_eqn.invars[other], jnp.asarray(invals[other])
    out_shape = tuple(add_eqn.outvars[0].aval.shape)
    if not out_shape:
        return None
    n = out_shape[-1]
    if b.ndim == 0 or all(d == 1 for d in b.shape[:-1]) and b.shape[-1] in (1, n):
        return jnp.broadcast_to(b.reshape(-1), (n,)) if b.size in (1, n) else None
    eqn = None if not hasattr(b_var, "aval") else producers_map.get(b_var)
    if eqn is None or eqn.primitive.name != "broadcast_in_dim" or b.shape != out_shape:
        return None
    operand_shape = tuple(eqn.invars[0].aval.shape)
    dims = tuple(eqn.params["broadcast_dimensions"])
    if any(size != 1 and dim != len(out_shape) - 1 for size, dim in zip(operand_shape, dims, strict=True)):
        return None
    return b[(0,) * (b.ndim - 1)]  # a broadcast along every other axis: any row is the vector
