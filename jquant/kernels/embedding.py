"""Weight-only embedding lookup: ``gather`` on the integer table, then dequantize only the gathered rows.

``quantized_gather(table, indices, **gather_params)`` computes what ``lax.gather(table.dequantize(), indices,
**gather_params)`` computes (the fake-quant table, then the gather; bit for bit: the same per-element
dequantization) without materializing the float table: the integers are gathered (int8, or int4 bytes two per
value when the packed axis is sliced whole), and the qparams are gathered with the same indices from an array
that keeps only the axes they vary along (the per-row scales of an embedding: one value per row). Positions a
``FILL_OR_DROP`` gather drops (out-of-bounds indices) get the gather's ``fill_value`` (NaN when None), as the
float gather gives.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from jquant.kernels.weights import QuantizedWeight
from jquant.numerics.exact import product_of_difference
from jquant.numerics.granularity import qparam_shape
from jquant.numerics.packing import unpack_int4


def _qparam_table(values: jnp.ndarray, table: QuantizedWeight, keep: tuple[int, ...]) -> jnp.ndarray:
    """``values`` (one per block) as an array of the table's rank: full size on the ``keep`` axes and on the axes
    they vary along, size 1 elsewhere (broadcast along the axes that are kept but constant)."""
    counts = qparam_shape(table.shape, table.block_size)
    p = jnp.asarray(values).reshape(counts)
    for axis, (n, c) in enumerate(zip(table.shape, counts, strict=True)):
        if c not in (1, n):
            raise ValueError(f"table: block_size {table.block_size} groups axis {axis}; quantized_gather needs "
                             "per-tensor or per-axis qparams")
    shape = tuple(n if (a in keep or c == n) else 1 for a, (n, c) in enumerate(zip(table.shape, counts, strict=True)))
    return jnp.broadcast_to(p, shape)


def _offset_axis(dimension_numbers, operand_axis: int, ndim: int) -> int | None:
    """The output axis of a gather that holds operand axis ``operand_axis`` (None when it is collapsed)."""
    dropped = set(dimension_numbers.collapsed_slice_dims) | set(dimension_numbers.operand_batching_dims)
    if operand_axis in dropped:
        return None
    kept = [a for a in range(ndim) if a not in dropped]
    return dimension_numbers.offset_dims[kept.index(operand_axis)]


def quantized_gather(
    table: QuantizedWeight,
    indices: jnp.ndarray,
    *,
    dimension_numbers: Any,
    slice_sizes: tuple[int, ...],
    mode: Any = None,
    fill_value: Any = None,
    indices_are_sorted: bool = False,
    unique_indices: bool = False,
    dtype: Any = jnp.float32,
) -> jnp.ndarray:
    """``lax.gather`` of the dequantized ``table`` (an embedding lookup), gathering integers (see the module).

    The keyword arguments are a ``gather`` equation's params (``dimension_numbers``, ``slice_sizes``, ``mode``,
    ``fill_value``, ...). ``dtype``: the float dtype of the result (the table's float dtype).
    """
    dn = dimension_numbers
    ndim = len(table.shape)
    slice_sizes = tuple(int(s) for s in slice_sizes)
    kw = dict(dimension_numbers=dn, indices_are_sorted=indices_are_sorted, unique_indices=unique_indices, mode=mode)
    # Axes whose indexing must match the table's (bounds and clamping depend on the axis size): every indexed
    # or batching axis keeps its full size in the qparam arrays.
    indexed = tuple(sorted(set(dn.start_index_map) | set(dn.operand_batching_dims)))

    def gather_params(values: jnp.ndarray, fill: Any) -> jnp.ndarray:
        p = _qparam_table(values, table, indexed)
        sizes = tuple(s if p.shape[a] == table.shape[a] else 1 for a, s in enumerate(slice_sizes))
        return lax.gather(p, indices, slice_sizes=sizes, fill_value=fill, **kw)

    q = None
    if table.qvalue is not None and table.packed and table.packed_axis not in indexed \
            and slice_sizes[table.packed_axis] == table.shape[table.packed_axis]:
        # int4: gather whole packed bytes (the packed axis is sliced whole), unpack only the gathered rows
        sizes = list(slice_sizes)
        sizes[table.packed_axis] //= 2
        out_axis = _offset_axis(dn, table.packed_axis, ndim)
        if out_axis is not None:
            packed = lax.gather(table.qvalue, indices, slice_sizes=tuple(sizes), fill_value=0, **kw)
            q = unpack_int4(packed, axis=out_axis, signed=True)
    if q is None:
        values = table.qvalue if table.qvalue is not None and not table.packed else table.int_values()
        q = lax.gather(values, indices, slice_sizes=slice_sizes, fill_value=0, **kw)
    scale = gather_params(table.scale, jnp.nan)  # NaN where a FILL_OR_DROP gather drops the position
    q = q.astype(jnp.float32)
    if table.float_zero_point is not None:
        zp = gather_params(table.float_zero_point, 0.0)
        y = product_of_difference(q + table.value_offset, zp, scale)
    elif table.zero_point is not None:
        zp = gather_params(table.zero_point, 0)
        y = (q - zp.astype(jnp.float32)) * scale
    else:
        y = q * scale
    if fill_value is not None:
        y = jnp.where(jnp.isnan(scale), jnp.asarray(fill_value, jnp.float32), y)
    return y.astype(dtype)
