"""QAT fast path: the forward runs the int8 x int8 -> int32 dot, the backward is straight-through in float32.

``qat_int8_matmul(x, w, ...)`` computes exactly what ``fake_quant(x) @ fake_quant(w)`` computes (integer sums
are exact; one float rescale) and has the fake-quant STE gradients: ``dx = (dy @ fq(w).T) * in_range(x)``,
``dw = (fq(x).T @ dy) * in_range(w)``, no gradient to the qparams (they come from observers). The backward
recomputes ``fq`` and the masks from the saved float inputs (one fused elementwise pass each).

``qf.apply(qstate, *args, mode="qat", int8_forward=True)`` runs every eligible
``dot_general`` site (int8 / uint8 static per-tensor activations, int8 symmetric per-tensor or single-axis
per-channel weights, STE, no output spec) on the fast path; other sites run the transform's own QAT handler.
Observers are updated exactly as in ``mode="qat"``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jquant.kernels import native
from jquant.kernels.dot import DotLayout
from jquant.kernels.matmul import int8_matmul
from jquant.kernels.weights import canonical_matrix
from jquant.numerics.affine import reciprocal, round_to_grid
from jquant.numerics.qschemes import is_symmetric
from jquant.numerics.qtypes import qrange
from jquant.transform import slots
from jquant.transform.handler import QuantizeHandler, layout_of
from jquant.transform.higher_order import zero_tangents
from jquant.transform.specs import QuantizationSpec


def _grid(x, scale, zero_point, qmin, qmax):
    q = round_to_grid(x, reciprocal(scale), zero_point)
    return jnp.clip(q, qmin, qmax), (q >= qmin) & (q <= qmax)


@partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def qat_int8_matmul(x, w, x_scale, x_zero_point, w_scale, w_zero_point, x_range, w_range, int8_backward=False):
    """``fq(x) @ fq(w)`` for ``x (M, K)``, ``w (K, N)`` via an int8 dot; STE backward (see module docstring).

    ``x_scale``/``x_zero_point``: per-tensor scalars; ``w_scale`` ``(N,)`` or scalar, ``w_zero_point`` must be 0
    (symmetric weights); ``x_range``/``w_range``: ``(qmin, qmax)`` with ``qmax - qmin <= 255``.
    ``int8_backward``: also run the input-gradient dot ``dx`` in int8 (AQT-style): the output gradient is
    quantized dynamically to int8 per row (after folding in the weight scales). This adds gradient rounding
    noise (relative ~1/254 of each row's largest value); ``dw`` stays float32.
    """
    return _forward(x, w, x_scale, x_zero_point, w_scale, x_range, w_range)


def _forward(x, w, x_scale, x_zero_point, w_scale, x_range, w_range):
    x_zp = jnp.asarray(x_zero_point, jnp.int32)
    qx, _ = _grid(x.astype(jnp.float32), x_scale, x_zp, *x_range)
    qw, _ = _grid(w.astype(jnp.float32), w_scale, jnp.zeros((), jnp.int32), *w_range)
    shift = 128 if x_range[1] > 127 else 0  # uint8 activations run as int8 with a shifted zero point
    qx8 = (qx.astype(jnp.int32) - shift).astype(jnp.int8)
    qw8 = qw.astype(jnp.int8)
    acc = int8_matmul(qx8, qw8) - (x_zp - shift) * _column_sums(qw8)
    return (acc.astype(jnp.float32) * (x_scale * w_scale)).astype(x.dtype)


def _column_sums(qw8: jnp.ndarray) -> jnp.ndarray:
    """``sum_k qw8[k, n]`` (int32, exact) as an int8 dot with a row of ones: one read of the int8 weight, where
    ``sum(qw8.astype(int32), 0)`` made XLA write an int32 copy of the weight (4x its bytes) and reduce that."""
    ones = jnp.ones((2, qw8.shape[0]), jnp.int8)  # two rows: XLA:CPU's int8 dot is slow with one
    return lax.dot_general(ones, qw8, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)[0]


def _fwd(x, w, x_scale, x_zero_point, w_scale, w_zero_point, x_range, w_range, int8_backward):
    y = _forward(x, w, x_scale, x_zero_point, w_scale, x_range, w_range)
    return y, (x, w, x_scale, x_zero_point, w_scale, w_zero_point)


def _int8_rows(g: jnp.ndarray, axis: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Symmetric int8 quantization of ``g`` with one scale per slice along ``axis`` (reduced), as (q, scale)."""
    amax = jnp.max(jnp.abs(g), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    return jnp.clip(jnp.round(g / scale), -127, 127).astype(jnp.int8), scale


def _int8_backward(dy, qx, x_zp, x_scale, qw, w_scale):
    """``dx`` with an int8 dot (the output gradient quantized per row, weight scales folded in); ``dw`` in f32.

    ``dw`` stays float: its int8 form needs transposed int8 operands, which XLA:CPU lays out column-major and
    then runs on a slow generic loop instead of its int8 kernel.
    """
    qg, row_scale = _int8_rows(dy * w_scale, axis=1)
    qw8 = qw.astype(jnp.int8)
    if native.use_native_gemm(qg.shape[0]):
        dx = int8_matmul(qg, qw8.T)  # the native GEMM packs W^T like any weight
    else:
        # XLA: (M, N) x (K, N) contracting N, a form its int8 kernel takes as is; a transposed int8 operand
        # (``int8_matmul(qg, qw8.T)``) is laid out column-major and upcast to an s32 x s32 dot, far slower.
        dx = lax.dot_general(qg, qw8, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    fx = (qx - x_zp.astype(jnp.float32)) * x_scale
    return dx.astype(jnp.float32) * row_scale, fx.T @ dy


def _bwd(x_range, w_range, int8_backward, residuals, dy):
    x, w, x_scale, x_zero_point, w_scale, w_zero_point = residuals
    x_zp = jnp.asarray(x_zero_point, jnp.int32)
    qx, mask_x = _grid(x.astype(jnp.float32), x_scale, x_zp, *x_range)
    qw, mask_w = _grid(w.astype(jnp.float32), w_scale, jnp.zeros((), jnp.int32), *w_range)
    dy = dy.astype(jnp.float32)
    if int8_backward:
        dx_full, dw_full = _int8_backward(dy, qx, x_zp, x_scale, qw, w_scale)
    else:
        fx = (qx - x_zp.astype(jnp.float32)) * x_scale
        fw = qw * w_scale
        dx_full, dw_full = dy @ fw.T, fx.T @ dy
    dx = jnp.where(mask_x, dx_full, 0.0).astype(x.dtype)
    dw = jnp.where(mask_w, dw_full, 0.0).astype(w.dtype)
    return dx, dw, jnp.zeros_like(x_scale), zero_tangents(x_zero_point), jnp.zeros_like(w_scale), \
        zero_tangents(w_zero_point)


qat_int8_matmul.defvjp(_fwd, _bwd)


def _eligible(site, eqn) -> tuple[Any, Any] | None:
    """(weight operand, input operand) when the site can use the fast path, else None."""
    if site.primitive != "dot_general" or site.output_spec is not None or len(site.operands) != 2:
        return None
    weights = [op for op in site.operands if op.role == "weight"]
    inputs = [op for op in site.operands if op.role == "input"]
    if len(weights) != 1 or len(inputs) != 1:
        return None
    w_op, x_op = weights[0], inputs[0]
    ws, xs = w_op.spec, x_op.spec
    if not (isinstance(ws, QuantizationSpec) and isinstance(xs, QuantizationSpec)):
        return None
    if ws.dtype != "int8" or not is_symmetric(ws.qscheme) or ws.block_size or ws.is_dynamic or ws.fake_quant != "ste":
        return None
    if xs.dtype not in ("int8", "uint8") or xs.per_channel or xs.is_dynamic or xs.fake_quant != "ste":
        return None
    (_, _), (lb, rb) = eqn.params["dimension_numbers"]
    if lb or rb:
        return None
    return w_op, x_op


class Int8QATHandler(QuantizeHandler):
    """``mode="qat"`` site handler that runs eligible ``dot_general`` sites with ``qat_int8_matmul``."""

    def __init__(self, int8_backward: bool = False):
        super().__init__("qat")
        self.int8_backward = int8_backward

    def __call__(self, site, eqn, invals, state, scope):
        ops = _eligible(site, eqn)
        if ops is None:
            return super().__call__(site, eqn, invals, state, scope)
        w_op, x_op = ops
        w, x = invals[w_op.index], invals[x_op.index]
        w_layout = layout_of(site, w_op.key, w_op.spec)
        side = "rhs" if w_op.index == 1 else "lhs"
        layout = DotLayout.of(x.ndim, w.ndim, eqn.params["dimension_numbers"], side)
        # Multi-dim per-channel weights, or a per-channel axis that is contracted: not on the fast path.
        # Decided before observing, so a fallback site updates its observers exactly once (as plain QAT).
        if w_layout.perm is not None or (w_layout.axis is not None and w_layout.axis not in layout.w_free):
            return super().__call__(site, eqn, invals, state, scope)
        state = dict(state)
        for op, value in ((w_op, w), (x_op, x)):
            op_layout = layout_of(site, op.key, op.spec)
            state[op.key] = slots.observe(op.spec, op_layout, state[op.key], [value], set_learnable=False)
        x_scale, x_zp = slots.slot_qparams(state[x_op.key])
        w_scale, _ = slots.slot_qparams(state[w_op.key])
        free_shape = [w.shape[a] for a in layout.w_free]
        if w_layout.axis is None:
            w_scale_n = jnp.asarray(w_scale, jnp.float32).reshape(())
        else:
            expand = [1] * len(free_shape)
            position = layout.w_free.index(w_layout.axis)
            expand[position] = free_shape[position]
            w_scale_n = jnp.broadcast_to(jnp.asarray(w_scale, jnp.float32).reshape(expand), free_shape).reshape(-1)
        x_range = qrange(x_op.spec.dtype, x_op.spec.quant_min, x_op.spec.quant_max)
        w_range = qrange(w_op.spec.dtype, w_op.spec.quant_min, w_op.spec.quant_max)
        y2 = qat_int8_matmul(layout.x_matrix(x), canonical_matrix(w, layout.w_contract, layout.w_free),
                             jnp.asarray(x_scale, jnp.float32).reshape(()), jnp.asarray(x_zp).reshape(()),
                             w_scale_n, jnp.zeros((), jnp.int32), x_range, w_range, self.int8_backward)
        return [layout.output(y2, x.shape, w.shape)], state

