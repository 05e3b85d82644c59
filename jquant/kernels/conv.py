"""Integer ``conv_general_dilated``: static W8A8 and dynamic (per-tensor) W8A8.

Padding (and input dilation) is applied in the quantized domain with the activation's zero point, not 0, so
that padded positions stand for the real value 0 and the zero-point correction via the weight sums stays exact.
The convolution itself then runs unpadded, either as ``lax.conv_general_dilated(int8, int8,
preferred_element_type=int32)`` or (``impl="im2col"``, the default for ungrouped convs) as strided slices
concatenated into patches and one int8 matmul: on XLA:CPU the int8 matmul path is 1.5-2x faster than the int8
convolution, and ``conv_general_dilated_patches`` on int8 is very slow. For tiny contractions (a first layer
with one input channel) ``impl="float"`` computes the same exact integer sums with a float32 convolution.

When ``jquant.kernels.backend()`` is native, ``impl="auto"`` runs the im2col form on the native GEMM (per group
for up to ``NATIVE_MAX_GROUPS`` groups) with the zero-point correction, bias and rescale fused into its epilogue;
a kernel packed ahead of time by ``pack_conv_weight`` is used without repacking (ungrouped convs).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.kernels import native, packing
from jquant.kernels.activation import dynamic_qparams, quantize_activation
from jquant.kernels.epilogue import Epilogue
from jquant.kernels.matmul import int8_matmul
from jquant.kernels.weights import QuantizedWeight, pack_weight
from jquant.numerics.granularity import qparam_shape

CONV_IMPLS = ("auto", "im2col", "conv", "float")
# Below this many terms per output (kh * kw * c_in / groups) an int8 matmul does not pay off on XLA:CPU (its
# int8 kernels are tuned for long contractions); "float" then runs the same exact integer sums in float32.
SMALL_K = 64
NATIVE_MAX_GROUPS = 8  # grouped convs with more groups (depthwise) stay on XLA's convolution


def _dimension_numbers(x_ndim: int, dimension_numbers: Any) -> lax.ConvDimensionNumbers:
    shape = (1,) * x_ndim
    return lax.conv_dimension_numbers(shape, shape, dimension_numbers)


def conv_contracting_axes(ndim: int, dimension_numbers: Any = None) -> tuple[int, ...]:
    """The kernel axes a conv contracts, in im2col order (spatial..., in): what ``pack_weight`` needs."""
    spec = _dimension_numbers(ndim, dimension_numbers).rhs_spec
    return (*spec[2:], spec[1])


def pack_conv_weight(qw: QuantizedWeight, dimension_numbers: Any = None, *, force: bool = False,
                     keep_values: bool = True) -> QuantizedWeight:
    """``pack_weight`` for a conv kernel (``dimension_numbers`` as given to ``lax.conv_general_dilated``)."""
    return pack_weight(qw, conv_contracting_axes(len(qw.shape), dimension_numbers), force=force,
                       keep_values=keep_values)


def _channels_last(x: jnp.ndarray, spec: tuple[int, ...]) -> jnp.ndarray:
    """Input/output spec ``(batch, feature, spatial...)`` -> array ``(batch, spatial..., feature)``."""
    return jnp.transpose(x, (spec[0], *spec[2:], spec[1]))


def _kernel_spatial_first(w: jnp.ndarray, spec: tuple[int, ...]) -> jnp.ndarray:
    """Kernel spec ``(out, in, spatial...)`` -> array ``(spatial..., in, out)``."""
    return jnp.transpose(w, (*spec[2:], spec[1], spec[0]))


def _explicit_padding(padding, in_spatial, window, strides, rhs_dilation, lhs_dilation):
    if isinstance(padding, str):
        if any(d != 1 for d in lhs_dilation):
            raise ValueError("padding: give explicit (low, high) pads with lhs_dilation (as lax.conv_general_dilated)")
        dilated_window = [(k - 1) * d + 1 for k, d in zip(window, rhs_dilation, strict=True)]
        return lax.padtype_to_pads(in_spatial, dilated_window, strides, padding)
    return [tuple(p) for p in padding]


def _per_channel(w: QuantizedWeight, out_axis: int, name: str, p: jnp.ndarray | None) -> jnp.ndarray | None:
    if p is None:
        return None
    counts = qparam_shape(w.shape, w.block_size)
    if any(c != 1 for a, c in enumerate(counts) if a != out_axis):
        raise ValueError(f"w: conv kernels need per-tensor or per-output-channel {name}, got block_size {w.block_size}")
    return jnp.broadcast_to(p.reshape(-1), (w.shape[out_axis],))


def _patches(xp: jnp.ndarray, window, strides, rhs_dilation) -> jnp.ndarray:
    """``(N, spatial..., C)`` padded input -> ``(N, out_spatial..., prod(window) * C)`` patches (window-major)."""
    spatial = xp.shape[1:-1]
    out = [(n - (k - 1) * d - 1) // s + 1 for n, k, d, s in zip(spatial, window, rhs_dilation, strides, strict=True)]
    pieces = []
    for offsets in itertools.product(*(range(k) for k in window)):
        start = (0, *(o * d for o, d in zip(offsets, rhs_dilation, strict=True)), 0)
        limit = (xp.shape[0], *(s0 + (n - 1) * s + 1 for s0, n, s in zip(start[1:-1], out, strides, strict=True)),
                 xp.shape[-1])
        pieces.append(lax.slice(xp, start, limit, (1, *strides, 1)))
    return jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]


def _integer_conv(xq, x_zp, x_scale, w, *, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count, impl, bias_q, pad_batch_one, epilogue: Epilogue):
    dn = _dimension_numbers(xq.ndim, dimension_numbers)
    nsp = xq.ndim - 2
    strides = tuple(window_strides) if window_strides is not None else (1,) * nsp
    lhs_dilation = tuple(lhs_dilation) if lhs_dilation is not None else (1,) * nsp
    rhs_dilation = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * nsp
    out_axis = dn.rhs_spec[0]
    w_scale = _per_channel(w, out_axis, "scales", w.scale)
    if w.zero_point is not None:
        raise ValueError("w: integer convolutions need symmetric weights (zero_point None)")
    x_cl = _channels_last(xq, dn.lhs_spec)
    k_sf = _kernel_spatial_first(w.int_values(), dn.rhs_spec)  # (spatial..., in, out)
    window = k_sf.shape[:nsp]
    pads = _explicit_padding(padding, x_cl.shape[1:-1], window, strides, rhs_dilation, lhs_dilation)
    config = [(0, 0, 0)] + [(lo, hi, d - 1) for (lo, hi), d in zip(pads, lhs_dilation, strict=True)] + [(0, 0, 0)]
    xp = lax.pad(x_cl, x_zp.astype(jnp.int8), config)  # pad with the zero point: padded values mean 0.0
    sums = jnp.sum(k_sf.astype(jnp.int32), axis=tuple(range(nsp + 1)))  # (out,)
    k_size = int(np.prod(k_sf.shape[:-1]))
    if (impl == "auto" and feature_group_count <= NATIVE_MAX_GROUPS
            and native.use_native_gemm(math.prod(xp.shape[:-1]))):
        fused = epilogue if epilogue.native_out else epilogue._replace(out_scale=None)
        y = _native_conv(xp, x_zp, x_scale, w, k_sf, w_scale, window, strides, rhs_dilation, feature_group_count,
                         bias_q, dn, fused)
        if not epilogue.native_out:  # e.g. an int4 output: requantize in XLA
            y = epilogue._replace(bias=None, relu=False).apply(y)
        inverse = np.argsort((dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))
        return y, inverse, out_axis
    if impl == "auto":
        impl = "float" if k_size < SMALL_K else ("im2col" if feature_group_count == 1 else "conv")
    spatial = "".join("HWDABCEFG"[:nsp])
    channels_last = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    centered = False
    if impl == "float":
        if k_size * 128 * 255 >= 2**24:
            raise ValueError(f"impl: 'float' is exact only for small contractions; this conv has {k_size} terms")
        # Small integers in float32: the same exact integer sums, on the (faster here) float conv path.
        acc = lax.conv_general_dilated((xp.astype(jnp.int32) - x_zp).astype(jnp.float32), k_sf.astype(jnp.float32),
                                       strides, "VALID", rhs_dilation=rhs_dilation, dimension_numbers=channels_last,
                                       feature_group_count=feature_group_count)
        centered = True
    elif impl == "im2col":
        if feature_group_count != 1:
            raise ValueError("impl: 'im2col' needs feature_group_count == 1; use impl='conv' for grouped convs")
        patches = _patches(xp, window, strides, rhs_dilation)
        acc = int8_matmul(patches.reshape(-1, patches.shape[-1]), k_sf.reshape(-1, k_sf.shape[-1]),
                          pad_batch_one=pad_batch_one).reshape(*patches.shape[:-1], -1)
    elif impl == "conv":
        acc = lax.conv_general_dilated(xp, k_sf, strides, "VALID", rhs_dilation=rhs_dilation,
                                       dimension_numbers=channels_last, feature_group_count=feature_group_count,
                                       preferred_element_type=jnp.int32)
    else:
        raise ValueError(f"impl: expected one of {CONV_IMPLS}, got {impl!r}")
    if not centered:
        acc = acc - x_zp * sums  # exact zero-point correction (padding carries the zero point)
    if bias_q is not None:
        acc = acc + bias_q
    y = epilogue.apply(acc.astype(jnp.float32) * (x_scale * w_scale))
    inverse = np.argsort((dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1]))
    return y, inverse, out_axis


def _native_conv(xp, x_zp, x_scale, w, k_sf, w_scale, window, strides, rhs_dilation, groups, bias_q, dn,
                 epilogue: Epilogue | None = None):
    """im2col + the native GEMM per group, epilogue fused: float32 ``(N, out_spatial..., out)``, or the output
    requantized to uint8 / int8 when ``epilogue`` asks for it (bias, ReLU and requantize in the GEMM)."""
    c_in, c_out = xp.shape[-1], k_sf.shape[-1]
    cg, og = c_in // groups, c_out // groups
    prepacked = (groups == 1 and w.kernel_layout == "s8_k4" and w.w_sums is not None
                 and w.sum_axes == (*dn.rhs_spec[2:], dn.rhs_spec[1]))
    col_scale = x_scale * w_scale
    ep = epilogue or Epilogue()
    out_kw = ep.native_kwargs()
    outs = []
    for g in range(groups):
        xg = xp if groups == 1 else xp[..., g * cg:(g + 1) * cg]
        patches = _patches(xg, window, strides, rhs_dilation)
        if prepacked:
            packed, colsum = w.kernel_data, w.w_sums[0]
        else:
            kg = k_sf[..., g * og:(g + 1) * og].reshape(-1, og)
            packed, colsum = packing.pack_s8_k4(kg), jnp.sum(kg.astype(jnp.int32), axis=0)
        part = slice(g * og, (g + 1) * og)
        # Padding carries the zero point, so the kernel's zero-point correction is exact.
        outs.append(native.gemm_s8(patches, packed, colsum, n=og, a_zero_point=x_zp,
                                   col_offset=None if bias_q is None else bias_q[part],
                                   col_scale=col_scale[part], bias=None if ep.bias is None else ep.bias[part],
                                   relu=ep.relu, **out_kw))
    return outs[0] if groups == 1 else jnp.concatenate(outs, axis=-1)


def int8_conv(
    x: jnp.ndarray,
    w: QuantizedWeight,
    window_strides=None,
    padding: Any = "VALID",
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    *,
    act_scale: Any,
    act_zero_point: Any = 0,
    act_dtype: Any = "uint8",
    act_quant_min: int | None = None,
    act_quant_max: int | None = None,
    act_inv_scale: Any = None,
    bias: Any = None,
    bias_int32: bool = True,
    relu: bool = False,
    out_scale: Any = None,
    out_zero_point: Any = 0,
    out_dtype: Any = "uint8",
    out_quant_min: int | None = None,
    out_quant_max: int | None = None,
    impl: str = "auto",
    pad_batch_one: bool | None = None,
) -> jnp.ndarray:
    """Static W8A8 ``lax.conv_general_dilated(x, w_float, ...)`` with int32 accumulation.

    Positional arguments follow ``lax.conv_general_dilated``. ``x`` is float, or integers already quantized with
    the activation qparams. ``bias`` has one value per output feature and is added in int32 with the derived scale
    ``act_scale * w_scale`` when ``bias_int32``, else in float after the rescale. Returns float32, or (``out_scale``
    given) the output requantized as ``out_dtype`` after an optional ``relu`` (torch's quantized conv / ConvReLU:
    the epilogue is fused into the native GEMM).
    """
    x_scale = jnp.asarray(act_scale, jnp.float32)
    if x_scale.size != 1:
        raise ValueError(f"act_scale: static activations use one per-tensor scale, got shape {x_scale.shape}")
    x_scale = x_scale.reshape(())
    xq, x_zp = quantize_activation(x, x_scale, jnp.asarray(act_zero_point).reshape(()), dtype=act_dtype,
                                   quant_min=act_quant_min, quant_max=act_quant_max, inv_scale=act_inv_scale)
    epilogue = Epilogue(relu=relu, out_scale=out_scale, out_zero_point=out_zero_point, out_dtype=out_dtype,
                        out_quant_min=out_quant_min, out_quant_max=out_quant_max)
    return _finish(xq, x_zp, x_scale, w, bias, bias_int32, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count, impl, pad_batch_one, epilogue)


def dynamic_int8_conv(
    x: jnp.ndarray,
    w: QuantizedWeight,
    window_strides=None,
    padding: Any = "VALID",
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    *,
    symmetric: bool = False,
    act_dtype: str | None = None,
    bias: Any = None,
    impl: str = "auto",
    pad_batch_one: bool | None = None,
) -> jnp.ndarray:
    """Dynamic W8A8 convolution: one activation scale (and zero point) computed from ``x`` at run time."""
    dtype = act_dtype or ("int8" if symmetric else "uint8")
    x_scale, x_zp = dynamic_qparams(x.astype(jnp.float32), tuple(range(x.ndim)), symmetric=symmetric, dtype=dtype)
    x_scale, x_zp = x_scale.reshape(()), x_zp.reshape(())
    xq, x_zp = quantize_activation(x, x_scale, x_zp, dtype=dtype)
    return _finish(xq, x_zp, x_scale, w, bias, False, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count, impl, pad_batch_one, Epilogue())


def _finish(xq, x_zp, x_scale, w, bias, bias_int32, window_strides, padding, lhs_dilation, rhs_dilation,
            dimension_numbers, feature_group_count, impl, pad_batch_one, epilogue: Epilogue):
    if len(w.shape) != xq.ndim:
        raise ValueError(f"w: kernel rank {len(w.shape)} does not match the input rank {xq.ndim}")
    dn = _dimension_numbers(xq.ndim, dimension_numbers)
    out_axis = dn.rhs_spec[0]
    bias_f = None
    if bias is not None:
        bias_f = jnp.broadcast_to(jnp.asarray(bias, jnp.float32).reshape(-1), (w.shape[out_axis],))
    bias_q = None
    if bias_f is not None and bias_int32:
        bias_q = jnp.round(bias_f / (x_scale * _per_channel(w, out_axis, "scales", w.scale))).astype(jnp.int32)
        bias_f = None
    y, inverse, _ = _integer_conv(
        xq, x_zp, x_scale, w, window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        impl=impl, bias_q=bias_q, pad_batch_one=pad_batch_one, epilogue=epilogue._replace(bias=bias_f),
    )
    return jnp.transpose(y, tuple(inverse))
