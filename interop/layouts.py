"""Layout transforms between torch and Flax weight tensors (pure permutations and flips: bit-exact).

=================  ======================================  =====================================
layout             torch                                   Flax
=================  ======================================  =====================================
identity           biases, norms, Embedding ``weight``     ``bias``, ``scale``, ``embedding``
linear             Linear ``weight`` (out, in)             Dense ``kernel`` (in, out)
conv               Conv1d/2d/3d ``weight`` (O, I/g, *k)    Conv ``kernel`` (*k, I/g, O); grouped
                                                           and depthwise convs included
conv_transpose     ConvTranspose ``weight`` (I, O, *k)     ConvTranspose ``kernel`` (*k, I, O) with
                                                           the spatial dims flipped: Flax's default
                                                           ``transpose_kernel=False`` does not flip,
                                                           torch's transposed conv is the true
                                                           gradient of conv (flipped kernel)
=================  ======================================  =====================================

Flax ``ConvTranspose(transpose_kernel=True)`` flips and swaps in/out itself: its kernel is (*k, O, I)
unflipped, which is the ``conv`` layout.
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("identity", "linear", "conv", "conv_transpose", "embedding")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    return layout


def infer_layout(flax_leaf: str, ndim: int) -> str:
    """Default layout from the Flax leaf name and the tensor rank (a ``kernel`` is Dense or Conv)."""
    if flax_leaf == "kernel":
        if ndim == 2:
            return "linear"
        if ndim >= 3:
            return "conv"
    return "identity"


def _need_rank(x: np.ndarray, layout: str, min_ndim: int, exact: bool = False) -> None:
    if x.ndim < min_ndim or (exact and x.ndim != min_ndim):
        want = f"{min_ndim}" if exact else f">= {min_ndim}"
        raise ValueError(f"layout {layout!r} needs a rank-{want} tensor, got shape {x.shape}")


def torch_to_flax_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """Rearrange a torch tensor into the Flax layout."""
    check_layout(layout)
    if layout in ("identity", "embedding"):
        return x
    if layout == "linear":
        _need_rank(x, layout, 2, exact=True)
        return np.ascontiguousarray(x.T)
    _need_rank(x, layout, 3)
    spatial = tuple(range(2, x.ndim))
    if layout == "conv":
        return np.ascontiguousarray(np.transpose(x, (*spatial, 1, 0)))
    flipped = np.flip(x, axis=spatial)
    return np.ascontiguousarray(np.transpose(flipped, (*spatial, 0, 1)))


def flax_to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of :func:`torch_to_flax_layout`."""
    check_layout(layout)
    if layout in ("identity", "embedding"):
        return x
    if layout == "linear":
        _need_rank(x, layout, 2, exact=True)
        return np.ascontiguousarray(x.T)
    _need_rank(x, layout, 3)
    n = x.ndim
    spatial_src = tuple(range(n - 2))
    if layout == "conv":
        return np.ascontiguousarray(np.transpose(x, (n - 1, n - 2, *spatial_src)))
    torch_order = np.transpose(x, (n - 2, n - 1, *spatial_src))
    return np.ascontiguousarray(np.flip(torch_order, axis=tuple(range(2, n))))
