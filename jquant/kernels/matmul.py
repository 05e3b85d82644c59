"""The integer core: int8 x int8 -> int32 matmuls in a canonical 2-D (or grouped 3-D) layout.

Every quantized ``dot_general`` is brought to ``x (M, K) @ w (K, N)``; per-group weights to
``x (M, G, gs) , w (G, gs, N) -> (G, M, N)``. Zero-point corrections and the float rescale are applied to the
int32 accumulator so that XLA fuses them (with a following bias, activation and the next layer's quantize)
into one elementwise pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jquant.kernels import native, packing


def use_batch_one_padding() -> bool:
    """On XLA:CPU an int8 dot with one row falls off the fast path; padding to two rows is ~2x faster."""
    return jax.default_backend() == "cpu"


def int8_matmul(xq: jnp.ndarray, wq: jnp.ndarray, *, pad_batch_one: bool | None = None) -> jnp.ndarray:
    """``(M, K) int8 @ (K, N) int8 -> (M, N) int32``, exact.

    Runs the native GEMM when ``jquant.kernels.backend()`` is native (``wq`` is packed on each call: pass a
    ``QuantizedWeight`` made by ``pack_weight`` to the ``dot_general`` kernels to pack once), else XLA's int8 dot
    (``preferred_element_type=int32``). ``xq`` may also be uint8 on the native path.
    """
    if native.use_native_gemm(xq.shape[0]) and xq.dtype in (jnp.int8, jnp.uint8) and wq.dtype == jnp.int8:
        colsum = jnp.sum(wq.astype(jnp.int32), axis=0)
        return native.gemm_s8(xq, packing.pack_s8_k4(wq), colsum, n=wq.shape[1])
    if pad_batch_one is None:
        pad_batch_one = use_batch_one_padding()
    rows = xq.shape[0]
    if rows == 1 and pad_batch_one:
        xq = jnp.pad(xq, ((0, 1), (0, 0)))
    acc = lax.dot_general(xq, wq, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    return acc[:rows]


def int8_grouped_matmul(xq: jnp.ndarray, wq: jnp.ndarray, groups: int, *, pad_batch_one: bool | None = None):
    """``(M, K) int8`` by ``(K, N) int8`` with K split into ``groups``: per-group int32 sums ``(G, M, N)``."""
    if groups == 1:
        return int8_matmul(xq, wq, pad_batch_one=pad_batch_one)[None]
    if pad_batch_one is None:
        pad_batch_one = use_batch_one_padding()
    rows, k = xq.shape
    if rows == 1 and pad_batch_one:
        xq = jnp.pad(xq, ((0, 1), (0, 0)))
    xg = xq.reshape(xq.shape[0], groups, k // groups)
    wg = wq.reshape(groups, k // groups, wq.shape[1])
    acc = lax.dot_general(xg, wg, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32)
    return acc[:, :rows]


def zero_point_corrected(
    acc: jnp.ndarray,
    xq: jnp.ndarray,
    x_zp: jnp.ndarray,
    w_sums: jnp.ndarray | None,
    w_zp: jnp.ndarray | None,
    group_size: int,
) -> jnp.ndarray:
    """``sum_k (xq - x_zp)(wq - w_zp)`` per group from ``acc = sum_k xq wq`` (all int32, exact).

    ``acc`` (G, M, N); ``x_zp`` scalar or (M, 1); ``w_sums``/``w_zp`` (G, N), or None when the activation
    zero point is known to be 0 (``w_sums``) or the weight is symmetric (``w_zp``).
    """
    x_zp = jnp.asarray(x_zp, jnp.int32)
    if w_sums is not None:
        acc = acc - x_zp[None] * w_sums[:, None, :] if x_zp.ndim else acc - x_zp * w_sums[:, None, :]
    if w_zp is not None:
        groups = acc.shape[0]
        x_sums = jnp.sum(xq.astype(jnp.int32).reshape(xq.shape[0], groups, group_size), axis=2)  # (M, G)
        x_zp_b = x_zp[None] if x_zp.ndim else x_zp
        acc = acc - w_zp[:, None, :] * x_sums.T[:, :, None] + group_size * x_zp_b * w_zp[:, None, :]
    return acc
