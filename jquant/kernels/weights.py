"""Ahead-of-time weight quantization: float weights become int8 / packed int4 arrays plus scales.

A ``QuantizedWeight`` is a pytree leaf container: its arrays (``qvalue``, ``scale``, ``zero_point``, ``w_sums``,
``kernel_data``) are children, its layout facts (dtype, shape, block size, packing) are static aux data, so it
passes through ``jit``, ``tree_map`` and checkpointing like any params pytree. Scales follow
``jquant.numerics.granularity``: ``scale.shape == shape[i] // block_size[i]`` per dim, so one field covers
per-tensor, per-channel and per-group.

Unsigned weights (uint8 / uint4, e.g. torch's quint8 embeddings or asymmetric uint4 groups) are stored as their
signed equivalent: ``q - 2**(bits - 1)`` in int8 / int4, exact. With integer zero points the shift is folded into
the zero point (``zero_point - 2**(bits - 1)``, so ``q - zp`` and every integer kernel are unchanged); a float
zero point (``per_channel_affine_float_qparams``) is kept as is in ``float_zero_point`` and the shift in
``value_offset`` (dequantized as ``(q_stored + value_offset - float_zero_point) * scale``, rounded once like
torch's float-qparams fake quant).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.numerics.affine import dequantize_affine, quantize_affine
from jquant.numerics.exact import product_of_difference
from jquant.numerics.granularity import apply_blockwise, normalize_axis, qparam_shape
from jquant.numerics.packing import pack_int4, unpack_int4
from jquant.numerics.qparams import choose_qparams
from jquant.numerics.qtypes import canonical_dtype

WEIGHT_DTYPES = ("int8", "int4")  # storage dtypes of a QuantizedWeight
UNSIGNED_STORAGE = {"uint8": "int8", "uint4": "int4"}  # quantized as unsigned, stored shifted to signed
QUANTIZE_DTYPES = WEIGHT_DTYPES + tuple(UNSIGNED_STORAGE)


def unsigned_offset(dtype: str) -> int:
    """The shift ``2**(bits - 1)`` an unsigned weight dtype is stored with (0 for signed dtypes)."""
    return {"uint8": 128, "uint4": 8}.get(canonical_dtype(dtype), 0)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedWeight:
    """An integer weight with its quantization parameters; the float weight is not kept.

    Granularity is one fact, ``block_size`` (per tensor, per channel, per group); ``axis`` / ``group_axis`` /
    ``group_size`` are derived from it.
    ``qvalue``: int8 values, or for ``packed`` int4 two values per uint8 byte along ``packed_axis``.
    ``scale``: float32 of shape ``shape[i] // block_size[i]``. ``zero_point``: int32 like ``scale`` or None
    (symmetric, or float qparams). ``float_zero_point``: float32 like ``scale`` for float qparams
    (``per_channel_affine_float_qparams``; integer kernels cannot use it: such weights are dequantized) or None;
    ``value_offset``: what the stored integers are shifted by (nonzero only with ``float_zero_point``, for an
    unsigned weight stored as signed; see the module docstring).
    ``w_sums``: int32 sums of the integer values over ``sum_axes`` (precomputed for the activation zero-point
    correction of W8A8 kernels) or None.
    ``kernel_data``: the same integer values in the native CPU kernels' packed layout ``kernel_layout`` (see
    ``jquant.kernels.packing``) for the contraction over ``sum_axes``, made once by ``pack_weight``; None when the
    kernels should pack per call (or run on XLA). ``qvalue`` is None when only the packed copy is kept
    (``pack_weight(..., keep_values=False)``, what ``jquant.convert`` stores): ``int_values()`` unpacks it.
    """

    qvalue: jnp.ndarray | None
    scale: jnp.ndarray
    zero_point: jnp.ndarray | None
    w_sums: jnp.ndarray | None = None
    kernel_data: jnp.ndarray | None = None
    float_zero_point: jnp.ndarray | None = None
    dtype: str = field(default="int8", metadata=dict(static=True))
    shape: tuple[int, ...] = field(default=(), metadata=dict(static=True))
    block_size: tuple[int, ...] = field(default=(), metadata=dict(static=True))
    packed: bool = field(default=False, metadata=dict(static=True))
    packed_axis: int | None = field(default=None, metadata=dict(static=True))
    sum_axes: tuple[int, ...] | None = field(default=None, metadata=dict(static=True))
    kernel_layout: str | None = field(default=None, metadata=dict(static=True))
    value_offset: int = field(default=0, metadata=dict(static=True))

    @property
    def axis(self) -> int | None:
        """The per-channel (output) axis, derived from ``block_size``: the dim of size > 1 with blocks of 1."""
        dims = [i for i, (n, b) in enumerate(zip(self.shape, self.block_size, strict=True)) if b == 1 and n > 1]
        return dims[0] if dims else None

    @property
    def group_axis(self) -> int | None:
        """The axis split into groups, derived from ``block_size``: the dim whose blocks are neither 1 nor whole."""
        dims = [i for i, (n, b) in enumerate(zip(self.shape, self.block_size, strict=True)) if 1 < b < n]
        return dims[0] if dims else None

    @property
    def group_size(self) -> int | None:
        """Weights per group along ``group_axis`` (None: no groups)."""
        axis = self.group_axis
        return None if axis is None else self.block_size[axis]

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (int values, scales, zero points, sums, and the native packed copy if any)."""
        return tree_nbytes([self.qvalue, self.scale, self.zero_point, self.w_sums, self.kernel_data,
                            self.float_zero_point])

    def int_values(self) -> jnp.ndarray:
        """The integer values as an int8 array of ``shape`` (unpacks int4, or the native packed copy)."""
        if self.qvalue is None:
            from jquant.kernels import packing

            axes = self.sum_axes
            free = tuple(a for a in range(len(self.shape)) if a not in axes)
            k = int(np.prod([self.shape[a] for a in axes]))
            q2d = packing.unpack(self.kernel_data, self.kernel_layout, k, int(np.prod(self.shape)) // k)
            permuted = q2d.reshape(tuple(self.shape[a] for a in (*axes, *free)))
            return jnp.transpose(permuted, tuple(np.argsort((*axes, *free))))
        if self.packed:
            return unpack_int4(self.qvalue, axis=self.packed_axis, signed=True)
        return self.qvalue

    def dequantize(self, dtype: Any = jnp.float32) -> jnp.ndarray:
        """The float weight the integer values stand for (what fake-quant computes)."""
        q = self.int_values()
        if self.float_zero_point is not None:
            # (q - zp) * scale rounded once, as the float-qparams fake quant computes it (``q + offset`` is exact)
            def values(v, s, zp):
                return product_of_difference(v.astype(jnp.float32) + self.value_offset, zp, s).astype(dtype)

            return apply_blockwise(values, q, self.block_size, self.scale, self.float_zero_point)
        return dequantize_affine(q, self.scale, self.zero_point, block_size=self.block_size, dtype=dtype)


def tree_nbytes(tree: Any) -> int:
    """Total bytes of the array leaves of ``tree`` (None leaves count 0)."""
    return int(sum(np.dtype(leaf.dtype).itemsize * int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)))


def weight_block_size(
    shape: Sequence[int], *, axis: int | None, group_size: int | None, group_axis: int | None
) -> tuple[int, ...]:
    """Block size for per-tensor (``axis=None``), per-channel (``axis``) or per-group (plus ``group_size``)."""
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    block = list(shape)
    if axis is not None:
        block[normalize_axis(axis, ndim, "axis")] = 1
    if group_size is not None:
        if group_axis is None:
            raise ValueError("group_axis: per-group quantization needs the (contracted) axis the groups run along")
        g = normalize_axis(group_axis, ndim, "group_axis")
        if axis is not None and g == normalize_axis(axis, ndim):
            raise ValueError(f"group_axis: {group_axis} is the channel axis; groups run along a contracted axis")
        if group_size < 1 or shape[g] % group_size:
            raise ValueError(f"group_size: {group_size} does not divide dim {g} of size {shape[g]} (shape {shape})")
        block[g] = group_size
    return tuple(block)


def quantize_weight(
    w: Any,
    *,
    dtype: str = "int8",
    axis: int | None = -1,
    group_size: int | None = None,
    group_axis: int | None = None,
    symmetric: bool = True,
    scale: Any = None,
    zero_point: Any = None,
    contracting_axes: Sequence[int] | None = None,
    pack: bool = True,
    quant_min: int | None = None,
    quant_max: int | None = None,
) -> QuantizedWeight:
    """Quantize a float weight once, ahead of time.

    ``dtype``: int8 / int4, or uint8 / uint4 (stored as their signed equivalent, see the module docstring).
    ``axis``: the output-channel axis for per-channel scales (None: per tensor; Flax kernels use -1).
    ``group_size``/``group_axis``: additionally split ``group_axis`` (the contracted axis) into groups.
    ``scale``/``zero_point``: use these qparams (e.g. from a calibrated observer) instead of min/max of ``w``; a
    float ``zero_point`` (``per_channel_affine_float_qparams``) is added before rounding and kept as
    ``float_zero_point``. ``symmetric``: zero point 0 for signed dtypes, the middle of the range
    (``2**(bits - 1)``, torch's uint8 symmetric 128) for unsigned ones; pass ``symmetric=False`` with the zero
    points for any other convention.
    ``contracting_axes``: the axes a dot / conv contracts; precomputes the per-group integer sums
    (``w_sums``, shape ``(G, N)`` in the canonical layout) used by the W8A8 activation zero-point correction.
    int4 values are packed two per byte along the last axis of even size when ``pack``.
    ``quant_min``/``quant_max``: a custom integer range within ``dtype`` (e.g. torch's reduce_range).
    """
    name = canonical_dtype(dtype)
    if name not in QUANTIZE_DTYPES:
        raise ValueError(f"dtype: weights are quantized as one of {QUANTIZE_DTYPES}, got {dtype!r}")
    storage, offset = UNSIGNED_STORAGE.get(name, name), unsigned_offset(name)
    w = jnp.asarray(w, jnp.float32)
    if w.ndim == 0:
        raise ValueError("w: expected an array with at least one dim, got a scalar")
    axis_n = None if axis is None else normalize_axis(axis, w.ndim, "axis")
    group_n = None if group_axis is None else normalize_axis(group_axis, w.ndim, "group_axis")
    block = weight_block_size(w.shape, axis=axis_n, group_size=group_size, group_axis=group_n)
    counts = qparam_shape(w.shape, block)
    if scale is None:
        blocked = _blocked_view(w, block)
        reduce_axes = tuple(range(1, 2 * w.ndim, 2))
        qscheme = "per_tensor_symmetric" if symmetric else "per_tensor_affine"
        scale, zero_point = choose_qparams(
            blocked.min(axis=reduce_axes), blocked.max(axis=reduce_axes), dtype=name, qscheme=qscheme
        )
    scale = jnp.asarray(scale, jnp.float32).reshape(counts)
    float_zp = zero_point is not None and jnp.issubdtype(jnp.result_type(zero_point), jnp.floating)
    if zero_point is not None:
        zero_point = jnp.asarray(zero_point, jnp.float32 if float_zp else jnp.int32).reshape(counts)
        if symmetric and (float_zp or not bool(jnp.all(zero_point == offset))):
            raise ValueError(f"zero_point: symmetric {name} weights need zero points of {offset}; pass "
                             "symmetric=False")
    if symmetric:
        zero_point = None
    zp = jnp.full(counts, offset, jnp.int32) if zero_point is None else zero_point
    q = quantize_affine(w, scale, zp, dtype=name, block_size=block, quant_min=quant_min, quant_max=quant_max)
    float_zero_point, value_offset = None, 0
    if offset:  # unsigned -> the signed equivalent (exact); the shift moves into the integer zero point
        q = (q.astype(jnp.int32) - offset).astype(jnp.int8)
        if float_zp:
            float_zero_point, value_offset = zero_point, offset
        elif zero_point is not None:
            zero_point = zero_point - offset
    elif float_zp:
        float_zero_point = zero_point
    if float_zp:
        zero_point = None
    w_sums, sum_axes = None, None
    if contracting_axes is not None:
        sum_axes = tuple(normalize_axis(a, w.ndim, "contracting_axes") for a in contracting_axes)
        free = tuple(a for a in range(w.ndim) if a not in sum_axes)
        q2d = canonical_matrix(q, sum_axes, free)
        groups = canonical_groups(w.shape, block, sum_axes)
        w_sums = jnp.sum(q2d.astype(jnp.int32).reshape(groups, -1, q2d.shape[1]), axis=1)
    packed, packed_axis = False, None
    if storage == "int4" and pack:
        packed_axis = _pack_axis(w.shape)
        q = pack_int4(q, axis=packed_axis)
        packed = True
    return QuantizedWeight(
        qvalue=q,
        scale=scale,
        zero_point=zero_point,
        w_sums=w_sums,
        float_zero_point=float_zero_point,
        value_offset=value_offset,
        dtype=storage,
        shape=tuple(w.shape),
        block_size=block,
        packed=packed,
        packed_axis=packed_axis,
        sum_axes=sum_axes,
    )


def pack_weight(qw: QuantizedWeight, contracting_axes: Sequence[int] | None = None, *,
                force: bool = False, keep_values: bool = True) -> QuantizedWeight:
    """``qw`` with its values also packed (once, ahead of time) for the native CPU kernels.

    ``contracting_axes``: the axes the dot / conv contracts (default ``qw.sum_axes``; for a canonical ``(K, N)``
    weight ``(0,)``; for a conv kernel ``conv_contracting_axes(dimension_numbers)``). Also sets ``w_sums`` (the
    per-group integer sums) for that contraction. Unless ``force``, returns ``qw`` unchanged when the native
    kernels are not in use (``jquant.kernels.backend() == "xla"``), so XLA / GPU params carry no second copy.
    The kernels use ``kernel_data`` automatically; without it they pack on every call. ``keep_values=False``
    drops ``qvalue`` (the packed copy is then the only one: half the bytes; ``int_values()`` unpacks it).
    """
    from jquant.kernels import native, packing

    if not force and not native.use_native():
        return qw
    axes = contracting_axes if contracting_axes is not None else qw.sum_axes
    if axes is None:
        raise ValueError("contracting_axes: give the contracted axes (the weight has no sum_axes)")
    ndim = len(qw.shape)
    axes = tuple(normalize_axis(a, ndim, "contracting_axes") for a in axes)
    free = tuple(a for a in range(ndim) if a not in axes)
    q2d = canonical_matrix(qw.int_values(), axes, free)
    groups = canonical_groups(qw.shape, qw.block_size, axes)
    w_sums = jnp.sum(q2d.astype(jnp.int32).reshape(groups, -1, q2d.shape[1]), axis=1)
    return dataclasses.replace(qw, w_sums=w_sums, sum_axes=axes, kernel_data=packing.pack(q2d, qw.dtype),
                               kernel_layout=packing.LAYOUTS[qw.dtype], qvalue=qw.qvalue if keep_values else None,
                               packed=qw.packed if keep_values else False,
                               packed_axis=qw.packed_axis if keep_values else None)


def canonical_matrix(q: jnp.ndarray, contracting: Sequence[int], free: Sequence[int]) -> jnp.ndarray:
    """``q`` as a ``(K, N)`` matrix: contracting axes first (in the given order), then free axes."""
    k = int(np.prod([q.shape[a] for a in contracting]))
    return jnp.transpose(q, tuple(contracting) + tuple(free)).reshape(k, -1)


def canonical_groups(shape: Sequence[int], block: Sequence[int], contracting: Sequence[int]) -> int:
    """Number of scale groups along the (flattened) contracting axes; groups need a single contracting axis."""
    counts = qparam_shape(shape, block)
    groups = int(np.prod([counts[a] for a in contracting]))
    if groups > 1 and len(contracting) != 1:
        raise ValueError(
            f"block_size: per-group scales {tuple(block)} need exactly one contracting axis, got {tuple(contracting)}"
        )
    return groups


def _blocked_view(w: jnp.ndarray, block: Sequence[int]) -> jnp.ndarray:
    interleaved = tuple(v for n, b in zip(w.shape, block, strict=True) for v in (n // b, b))
    return w.reshape(interleaved)


def _pack_axis(shape: Sequence[int]) -> int:
    for a in range(len(shape) - 1, -1, -1):
        if shape[a] % 2 == 0:
            return a
    raise ValueError(f"w: int4 packing needs an axis of even size, shape {tuple(shape)} has none; pass pack=False")
