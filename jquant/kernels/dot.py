"""Integer ``dot_general`` kernels: static W8A8, dynamic W8A8 and weight-only (int8 / packed int4).

Each kernel computes what ``lax.dot_general(x, w_float, dimension_numbers)`` computes (with ``x`` and the weight
in the positions given by ``weight_side``), from a ``QuantizedWeight`` made once ahead of time. Internally the
operands are brought to ``(M, K) @ (K, N)`` (free transposes/reshapes for the usual layouts), multiplied as
int8 x int8 -> int32, corrected for zero points in int32, and rescaled once to float32.

When ``jquant.kernels.backend()`` is native (CPU), eligible calls run the native kernels instead, with the
zero-point corrections, scales, bias, ReLU and requantization fused into the GEMM's epilogue: W8A8 with one
weight group and symmetric weights; weight-only int8 / int4 with symmetric weights (groups of a multiple of 4 /
8). A weight packed ahead of time by ``pack_weight`` is used as is; otherwise it is packed on each call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.kernels import native, packing
from jquant.kernels.activation import dynamic_qparams, quantize_activation
from jquant.kernels.epilogue import Epilogue
from jquant.kernels.matmul import int8_grouped_matmul, zero_point_corrected
from jquant.kernels.weights import QuantizedWeight, canonical_groups, canonical_matrix
from jquant.numerics.granularity import qparam_shape

FLOAT_OUTPUT = Epilogue()
WEIGHT_ONLY_IMPLS = ("auto", "native", "dynamic", "dequantize")


@dataclass(frozen=True)
class DotLayout:
    """How a ``dot_general`` with one weight operand maps onto ``(M, K) @ (K, N)``."""

    x_contract: tuple[int, ...]
    x_free: tuple[int, ...]
    w_contract: tuple[int, ...]
    w_free: tuple[int, ...]
    weight_side: str

    @classmethod
    def of(cls, x_ndim: int, w_ndim: int, dimension_numbers: Any, weight_side: str) -> DotLayout:
        (lc, rc), (lb, rb) = dimension_numbers
        if weight_side not in ("lhs", "rhs"):
            raise ValueError(f"weight_side: expected 'lhs' or 'rhs', got {weight_side!r}")
        if lb or rb:
            raise ValueError(
                f"dimension_numbers: the weight operand has batch dims {tuple(rb if weight_side == 'rhs' else lb)}; "
                "integer kernels need a weight without batch dims (slice it per batch element first)"
            )
        xc, wc = (tuple(lc), tuple(rc)) if weight_side == "rhs" else (tuple(rc), tuple(lc))
        xf = tuple(a for a in range(x_ndim) if a not in xc)
        wf = tuple(a for a in range(w_ndim) if a not in wc)
        return cls(xc, xf, wc, wf, weight_side)

    def x_matrix(self, x: jnp.ndarray) -> jnp.ndarray:
        return jnp.transpose(x, self.x_free + self.x_contract).reshape(-1, self.k(x.shape))

    def k(self, x_shape: tuple[int, ...]) -> int:
        return int(np.prod([x_shape[a] for a in self.x_contract]))

    def output(self, out2d: jnp.ndarray, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> jnp.ndarray:
        xs = tuple(x_shape[a] for a in self.x_free)
        ws = tuple(w_shape[a] for a in self.w_free)
        out = out2d.reshape(xs + ws)
        if self.weight_side == "lhs":
            out = jnp.transpose(out, tuple(range(len(xs), len(xs) + len(ws))) + tuple(range(len(xs))))
        return out


@dataclass(frozen=True)
class CanonicalWeight:
    """A ``QuantizedWeight`` as ``q (K, N)`` int8 with per-group ``scale``/``zero_point``/``sums`` ``(G, N)``."""

    q: jnp.ndarray
    scale: jnp.ndarray
    zero_point: jnp.ndarray | None
    sums: jnp.ndarray | None
    groups: int

    @classmethod
    def of(cls, w: QuantizedWeight, contract: tuple[int, ...], free: tuple[int, ...], need_sums: bool = True
           ) -> CanonicalWeight:
        if w.dtype not in ("int8", "int4"):
            raise ValueError(f"w: integer kernels need an int8 or int4 QuantizedWeight, got {w.dtype!r}")
        if w.float_zero_point is not None:
            raise ValueError("w: float zero points (per_channel_affine_float_qparams) have no integer kernel; "
                             "use weight_only_dot_general (it dequantizes them) or dequantize the weight")
        q = canonical_matrix(w.int_values(), contract, free)
        groups = canonical_groups(w.shape, w.block_size, contract)
        counts = qparam_shape(w.shape, w.block_size)
        for a in free:
            if counts[a] not in (1, w.shape[a]):
                raise ValueError(f"w: block_size {w.block_size} splits output axis {a}; only per-channel is supported")

        def per_group(p):
            target = [counts[a] for a in contract] + [w.shape[a] for a in free]
            p = jnp.transpose(p.reshape(counts), contract + free)
            return jnp.broadcast_to(p, target).reshape(groups, -1)

        scale = per_group(w.scale)
        zero_point = None if w.zero_point is None else per_group(w.zero_point.astype(jnp.int32))
        if w.w_sums is not None and w.sum_axes == contract:
            sums = w.w_sums
        elif not need_sums:  # the activation zero point is 0 by construction (symmetric)
            sums = None
        else:  # not precomputed for this contraction: one reduction over the weight per call
            sums = jnp.sum(q.astype(jnp.int32).reshape(groups, -1, q.shape[1]), axis=1)
        return cls(q, scale, zero_point, sums, groups)


def _integer_dot(xq, x_zp, x_scale, cw: CanonicalWeight, pad_batch_one, bias_q=None) -> jnp.ndarray:
    """Float32 ``(M, N)`` result of ``(xq - x_zp) * x_scale`` times the dequantized canonical weight."""
    k = xq.shape[1]
    acc = int8_grouped_matmul(xq, cw.q, cw.groups, pad_batch_one=pad_batch_one)
    acc = zero_point_corrected(acc, xq, x_zp, cw.sums, cw.zero_point, k // cw.groups)
    if cw.groups == 1:
        acc = acc[0] if bias_q is None else acc[0] + bias_q
        return acc.astype(jnp.float32) * (x_scale * cw.scale[0])
    return jnp.sum(acc.astype(jnp.float32) * cw.scale[:, None, :], axis=0) * x_scale


def _bias_for_output(bias, layout: DotLayout, w: QuantizedWeight) -> jnp.ndarray:
    if layout.weight_side != "rhs":
        raise ValueError("bias: only supported with weight_side='rhs' (bias along the last output dims)")
    free_shape = tuple(w.shape[a] for a in layout.w_free)
    return jnp.broadcast_to(jnp.asarray(bias, jnp.float32), free_shape).reshape(-1)


def _native_w8a8_ok(w: QuantizedWeight, cw: CanonicalWeight, rows: int) -> bool:
    return native.use_native_gemm(rows) and cw.groups == 1 and cw.zero_point is None and w.dtype in ("int8", "int4")


def _native_int8_operand(w: QuantizedWeight, cw: CanonicalWeight, layout: DotLayout):
    """(packed "s8_k4" weight, int32 column sums (N,)) for the native GEMM: prepacked when available."""
    if w.kernel_layout == "s8_k4" and w.sum_axes == layout.w_contract and w.w_sums is not None:
        return w.kernel_data, w.w_sums[0]
    sums = cw.sums[0] if cw.sums is not None else jnp.sum(cw.q.astype(jnp.int32), axis=0)
    return packing.pack_s8_k4(cw.q), sums


def _native_int8_dot(xq2, x_zp, packed, colsum, *, n, row_scale, col_scale, bias_q=None,
                     epilogue: Epilogue = FLOAT_OUTPUT):
    """The native GEMM of int8 (shifted) activations ``xq2 (M, K)`` with the whole epilogue; ``x_zp`` per tensor
    or per row."""
    fused = epilogue if epilogue.native_out else epilogue._replace(out_scale=None)
    y = native.gemm_s8(xq2, packed, colsum, n=n, a_zero_point=x_zp, col_offset=bias_q, row_scale=row_scale,
                       col_scale=col_scale, bias=fused.bias, relu=fused.relu, **fused.native_kwargs())
    if not epilogue.native_out:  # e.g. int4 outputs: requantize in XLA
        y = epilogue._replace(bias=None, relu=False).apply(y)
    return y


def int8_dot_general(
    x: jnp.ndarray,
    w: QuantizedWeight,
    dimension_numbers: Any,
    *,
    act_scale: Any,
    act_zero_point: Any = 0,
    act_dtype: Any = "uint8",
    act_quant_min: int | None = None,
    act_quant_max: int | None = None,
    act_inv_scale: Any = None,
    weight_side: str = "rhs",
    bias: Any = None,
    bias_int32: bool = True,
    out_scale: Any = None,
    out_zero_point: Any = 0,
    out_dtype: Any = "uint8",
    out_quant_min: int | None = None,
    out_quant_max: int | None = None,
    relu: bool = False,
    pad_batch_one: bool | None = None,
) -> jnp.ndarray:
    """Static W8A8 ``dot_general``: calibrated per-tensor activation qparams, int8 weight, int32 accumulation.

    ``x`` is float (quantized here with ``act_scale``/``act_zero_point``; ``act_inv_scale`` optionally gives the
    precomputed ``1 / act_scale``) or already-quantized integers.
    ``bias`` (float, along the weight's output dims) is added in int32 with the derived scale
    ``act_scale * w_scale`` when ``bias_int32`` (per-channel weights), else in float. Returns float32, or the
    output quantized with ``out_scale``/``out_zero_point`` as ``out_dtype`` when ``out_scale`` is given.
    ``relu``: ``max(y, 0)`` before the output quantization (fused into the native epilogue).
    """
    layout = DotLayout.of(x.ndim, len(w.shape), dimension_numbers, weight_side)
    cw = CanonicalWeight.of(w, layout.w_contract, layout.w_free)
    x_scale = jnp.asarray(act_scale, jnp.float32)
    if x_scale.size != 1:
        raise ValueError(f"act_scale: static activations use one per-tensor scale, got shape {x_scale.shape}")
    x_scale = x_scale.reshape(())
    xq, x_zp = quantize_activation(
        x, x_scale, jnp.asarray(act_zero_point).reshape(()), dtype=act_dtype,
        quant_min=act_quant_min, quant_max=act_quant_max, inv_scale=act_inv_scale,
    )
    bias_q, bias_f = None, None
    if bias is not None:
        bias_f = _bias_for_output(bias, layout, w)
        if bias_int32 and cw.groups == 1:
            derived = x_scale * cw.scale[0]
            bias_q = jnp.round(bias_f / derived).astype(jnp.int32)
            bias_f = None
    epilogue = Epilogue(bias=bias_f, relu=relu, out_scale=out_scale, out_zero_point=out_zero_point,
                        out_dtype=out_dtype, out_quant_min=out_quant_min, out_quant_max=out_quant_max)
    if _native_w8a8_ok(w, cw, math.prod(x.shape[a] for a in layout.x_free)):
        packed, colsum = _native_int8_operand(w, cw, layout)
        y = _native_int8_dot(layout.x_matrix(xq), x_zp, packed, colsum, n=cw.q.shape[1], row_scale=None,
                             col_scale=x_scale * cw.scale[0], bias_q=bias_q, epilogue=epilogue)
        return layout.output(y, x.shape, w.shape)
    y = epilogue.apply(_integer_dot(layout.x_matrix(xq), x_zp, x_scale, cw, pad_batch_one, bias_q))
    return layout.output(y, x.shape, w.shape)


def dynamic_int8_dot_general(
    x: jnp.ndarray,
    w: QuantizedWeight,
    dimension_numbers: Any,
    *,
    weight_side: str = "rhs",
    per_token: bool = True,
    symmetric: bool = True,
    act_dtype: str | None = None,
    bias: Any = None,
    pad_batch_one: bool | None = None,
) -> jnp.ndarray:
    """Dynamic W8A8 ``dot_general``: activation qparams computed at run time (per row of the ``(M, K)``
    activation when ``per_token``, else per tensor), int8 weight. ``act_dtype`` defaults to int8 when
    ``symmetric`` and uint8 otherwise; qparams follow torch's observers (``choose_qparams``)."""
    layout = DotLayout.of(x.ndim, len(w.shape), dimension_numbers, weight_side)
    cw = CanonicalWeight.of(w, layout.w_contract, layout.w_free, need_sums=not symmetric)
    x2 = layout.x_matrix(x).astype(jnp.float32)
    axes = (1,) if per_token else (0, 1)
    dtype = act_dtype or ("int8" if symmetric else "uint8")
    x_scale, x_zp = dynamic_qparams(x2, axes, symmetric=symmetric, dtype=dtype)
    xq, x_zp = quantize_activation(x2, x_scale, x_zp, dtype=dtype)
    if _native_w8a8_ok(w, cw, xq.shape[0]):
        packed, colsum = _native_int8_operand(w, cw, layout)
        y = _native_int8_dot(xq, x_zp, packed, colsum, n=cw.q.shape[1], row_scale=x_scale, col_scale=cw.scale[0])
        if bias is not None:
            y = y + _bias_for_output(bias, layout, w)
        return layout.output(y, x.shape, w.shape)
    y = _integer_dot(xq, x_zp, x_scale, cw, pad_batch_one)
    if bias is not None:
        y = y + _bias_for_output(bias, layout, w)
    return layout.output(y, x.shape, w.shape)


def weight_only_dot_general(
    x: jnp.ndarray,
    w: QuantizedWeight,
    dimension_numbers: Any,
    *,
    weight_side: str = "rhs",
    bias: Any = None,
    impl: str = "auto",
    pad_batch_one: bool | None = None,
) -> jnp.ndarray:
    """Weight-only ``dot_general`` (int8 or group-wise int4 weight, float activation).

    ``impl="dequantize"``: float activation times the dequantized weight (exactly the weight-only fake-quant
    numerics; XLA materializes the float weight on every call). ``impl="native"``: the native CPU kernel
    (float activations times the packed integer weight, scales per group; the same numerics up to float
    summation order, without a float weight in memory). ``impl="dynamic"``: the activation is quantized per row
    to int8 at run time and the int8 dot is used (adds one activation rounding: opt in only).
    ``"auto"`` (exact): ``"native"`` where the native kernels run and the weight is eligible, else
    ``"dequantize"``. Float-qparams weights (``float_zero_point``) always take the dequantize path.
    """
    if impl not in WEIGHT_ONLY_IMPLS:
        raise ValueError(f"impl: expected one of {WEIGHT_ONLY_IMPLS}, got {impl!r}")
    if impl in ("auto", "native"):
        eligible = _native_weight_only_ok(w, x, dimension_numbers, weight_side)
        if impl == "native" and not eligible:
            raise ValueError("impl: 'native' needs the native CPU kernels (jquant.kernels.backend()), symmetric "
                             "int8/int4 weights with groups of a multiple of 4 (int8) / 8 (int4) and float inputs")
        impl = "native" if eligible else "dequantize"
    if w.float_zero_point is not None:
        if impl == "dynamic":
            raise ValueError("impl: 'dynamic' needs integer weight zero points; this weight has float qparams")
        # Float qparams: the exact fake-quant weight (its zero point is not an integer), then the float dot.
        layout = DotLayout.of(x.ndim, len(w.shape), dimension_numbers, weight_side)
        x2 = layout.x_matrix(x)
        dtype = x2.dtype if jnp.issubdtype(x2.dtype, jnp.floating) else jnp.float32
        wf = canonical_matrix(w.dequantize(dtype), layout.w_contract, layout.w_free)
        y = lax.dot(x2.astype(dtype), wf, preferred_element_type=jnp.float32)
        if bias is not None:
            y = y + _bias_for_output(bias, layout, w)
        return layout.output(y, x.shape, w.shape).astype(dtype)
    if impl == "dynamic":
        return dynamic_int8_dot_general(
            x, w, dimension_numbers, weight_side=weight_side, bias=bias, pad_batch_one=pad_batch_one
        )
    layout = DotLayout.of(x.ndim, len(w.shape), dimension_numbers, weight_side)
    cw = CanonicalWeight.of(w, layout.w_contract, layout.w_free, need_sums=False)
    x2 = layout.x_matrix(x)
    dtype = x2.dtype if jnp.issubdtype(x2.dtype, jnp.floating) else jnp.float32
    if impl == "native":
        k, n = cw.q.shape
        bits = 8 if w.dtype == "int8" else 4
        layout_name = packing.LAYOUTS[w.dtype]
        if w.kernel_layout == layout_name and w.sum_axes == layout.w_contract:
            packed = w.kernel_data
        else:
            packed = packing.pack(cw.q, w.dtype)
        xin = x2 if x2.dtype in (jnp.float32, jnp.bfloat16) else x2.astype(jnp.float32)
        y = _weight_only_native(xin, packed, cw.scale, k, n, bits, k // cw.groups if cw.groups > 1 else None)
        if bias is not None:
            y = y + _bias_for_output(bias, layout, w)
        return layout.output(y, x.shape, w.shape).astype(dtype)
    k, n = cw.q.shape
    wq = cw.q.reshape(cw.groups, k // cw.groups, n).astype(dtype)
    if cw.zero_point is not None:
        wq = wq - cw.zero_point[:, None, :].astype(dtype)
    if cw.groups == 1:  # per-channel: scale after the dot (scale is constant along K)
        y = lax.dot(x2.astype(dtype), wq[0], preferred_element_type=jnp.float32) * cw.scale[0]
    else:
        wf = (wq * cw.scale[:, None, :].astype(dtype)).reshape(k, n)
        y = lax.dot(x2.astype(dtype), wf, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + _bias_for_output(bias, layout, w)
    return layout.output(y, x.shape, w.shape).astype(dtype)


def _native_weight_only_ok(w: QuantizedWeight, x: jnp.ndarray, dimension_numbers: Any, weight_side: str) -> bool:
    if not native.use_native() or w.zero_point is not None or w.float_zero_point is not None:
        return False
    if w.dtype not in ("int8", "int4"):
        return False
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return False
    layout = DotLayout.of(x.ndim, len(w.shape), dimension_numbers, weight_side)
    try:
        groups = canonical_groups(w.shape, w.block_size, layout.w_contract)
    except ValueError:
        return False
    k = layout.k(x.shape)
    step = 4 if w.dtype == "int8" else 8
    return groups == 1 or (k // groups) % step == 0


def _dequantized(packed, scale, k, n, bits, group_size):
    q = packing.unpack(packed, packing.LAYOUTS["int8" if bits == 8 else "int4"], k, n).astype(jnp.float32)
    groups = scale.shape[0]
    return (q.reshape(groups, k // groups, n) * scale[:, None, :]).reshape(k, n)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _weight_only_native(x2, packed, scale, k, n, bits, group_size):
    """Native weight-only GEMM with a VJP (``dx``, ``dscale``) computed in XLA from the dequantized weight."""
    return native.weight_only(x2, packed, scale, n=n, bits=bits, group_size=group_size)


def _weight_only_native_fwd(x2, packed, scale, k, n, bits, group_size):
    return _weight_only_native(x2, packed, scale, k, n, bits, group_size), (x2, packed, scale)


def _weight_only_native_bwd(k, n, bits, group_size, residuals, dy):
    x2, packed, scale = residuals
    _, vjp = jax.vjp(lambda x, s: lax.dot(x.astype(jnp.float32), _dequantized(packed, s, k, n, bits, group_size)),
                     x2, scale)
    dx, dscale = vjp(dy.astype(jnp.float32))
    return dx.astype(x2.dtype), np.zeros(packed.shape, jax.dtypes.float0), dscale


_weight_only_native.defvjp(_weight_only_native_fwd, _weight_only_native_bwd)
