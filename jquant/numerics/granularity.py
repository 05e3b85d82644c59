"""One mechanism for every granularity: per-tensor, per-axis and per-block qparams.

A qparam array is broadcast against ``x`` in one of three ways:
- per tensor: ``axis=None, block_size=None`` and a scalar (or single-element) qparam;
- per axis: ``axis=k`` and a qparam of shape ``(x.shape[k],)``;
- per block: ``block_size`` with one entry per dim of ``x``; the qparam has shape ``x.shape[i] // block_size[i]``
  per dim (``block_size[i] == x.shape[i]`` means one block along that dim, ``1`` means one per element).
Per-axis is the block size ``(1 at axis, full elsewhere)``; per-tensor is the full shape. Blocks are applied by
reshaping ``x`` to ``(n0, b0, n1, b1, ...)`` so that no qparam is materialised at full size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: {axis} is out of range for an array with {ndim} dims")
    return axis % ndim


def block_size_for(shape: Sequence[int], axis: int | None, block_size: Sequence[int] | None) -> tuple[int, ...]:
    """The block size equivalent to ``axis``/``block_size`` (validated against ``shape``)."""
    ndim = len(shape)
    if axis is not None and block_size is not None:
        raise ValueError("axis/block_size: give one of them, not both")
    if block_size is not None:
        block_size = tuple(int(b) for b in block_size)
        if len(block_size) != ndim:
            raise ValueError(f"block_size: needs one entry per dim of the input shape {tuple(shape)}, got {block_size}")
        for dim, (n, b) in enumerate(zip(shape, block_size, strict=True)):
            if b < 1 or n % b:
                raise ValueError(
                    f"block_size: entry {b} at dim {dim} does not divide the input size {n} (shape {tuple(shape)})"
                )
        return block_size
    if axis is not None:
        axis = normalize_axis(axis, ndim)
        return tuple(1 if d == axis else n for d, n in enumerate(shape))
    return tuple(shape)


def qparam_shape(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    return tuple(n // b for n, b in zip(shape, block, strict=True))


def apply_blockwise(fn, x: jnp.ndarray, block: Sequence[int], *qparams: jnp.ndarray) -> jnp.ndarray:
    """Evaluate ``fn(x_blocks, *qparam_blocks)`` with each qparam broadcast over its block of ``x``.

    Each qparam must hold ``prod(qparam_shape)`` values (scalars and ``(1,)`` work for per-tensor). ``fn`` may
    return one array of ``x``'s (blocked) shape or a tuple of them.
    """
    shape = tuple(x.shape)
    counts = qparam_shape(shape, block)
    prepared = []
    for name, p in zip(("scale", "zero_point", "qparam"), qparams, strict=False):
        p = jnp.asarray(p)
        if p.size != _prod(counts) or (p.ndim and p.shape not in (counts, _squeezed(counts), (p.size,))):
            raise ValueError(
                f"{name}: shape {p.shape} does not match the input shape {shape} with block size {tuple(block)}; "
                f"expected {counts} (or {p.size if p.ndim == 1 else _prod(counts)} values)"
            )
        prepared.append(p)
    if all(b == n for b, n in zip(block, shape, strict=True)):  # per tensor: plain scalar broadcast
        return fn(x, *(p.reshape(()) for p in prepared))
    if all(b in (1, n) for b, n in zip(block, shape, strict=True)):  # per axis: broadcast without reshaping x
        return fn(x, *(p.reshape(counts) for p in prepared))
    interleaved = tuple(v for n, b in zip(counts, block, strict=True) for v in (n, b))
    pshape = tuple(v for n in counts for v in (n, 1))
    out = fn(x.reshape(interleaved), *(p.reshape(pshape) for p in prepared))
    return jax.tree.map(lambda o: o.reshape(shape), out)


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _squeezed(counts: Sequence[int]) -> tuple[int, ...]:
    return tuple(c for c in counts if c != 1)
