"""QAT fast path, ``int8_backward=True``: the input gradient ``dy @ W^T`` runs on the int8 kernels, within the error of
quantizing ``dy`` per row; the forward does not write an int32 copy of the weight for its zero-point correction."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.kernels import native
from jquant.numerics.affine import reciprocal, round_to_grid
from jquant.transform.int8_qat import qat_int8_matmul

M, K, N = 6, 96, 40
RNG = np.random.default_rng(3)
X = jnp.asarray(RNG.standard_normal((M, K)) * 2, jnp.float32)  # some activations clip: the mask matters
W = jnp.asarray(RNG.standard_normal((K, N)), jnp.float32)
XS, XZ = jnp.float32(0.02), jnp.int32(-3)
WS = jnp.asarray(RNG.uniform(0.005, 0.02, N), jnp.float32)
DY = jnp.asarray(RNG.standard_normal((M, N)), jnp.float32)
RANGE = (-128, 127)


def _dx(x, int8_backward):
    def f(v):
        return qat_int8_matmul(v, W, XS, XZ, WS, jnp.int32(0), RANGE, RANGE, int8_backward)

    return jax.vjp(f, x)[1](DY)[0]


def test_int8_input_gradient_within_row_quantization_error():
    dx_float = np.asarray(jax.jit(lambda v: _dx(v, False))(X))
    dx_int8 = np.asarray(jax.jit(lambda v: _dx(v, True))(X))
    # dy * w_scale is rounded per row to steps of amax / 127: each element is off by at most half a step, and
    # dx[m, k] = sum_n g[m, n] * qw[k, n], so |error| <= amax_m / 254 * sum_n |qw[k, n]| (plus f32 rounding).
    g = np.asarray(DY * WS)
    qw = np.clip(np.asarray(round_to_grid(W, reciprocal(WS), jnp.int32(0))), *RANGE)
    bound = np.abs(g).max(axis=1, keepdims=True) / 254.0 * np.abs(qw).sum(axis=1)[None, :]
    err = np.abs(dx_int8 - dx_float)
    assert np.all(err <= bound * 1.001 + 1e-6), float(np.max(err / (bound + 1e-12)))
    np.testing.assert_array_equal(dx_int8 == 0, dx_float == 0)  # the same straight-through mask
    assert 0 < np.abs(dx_float).mean() and np.abs(dx_int8 - dx_float).max() > 0  # really quantized


def _int8_dots(hlo: str) -> list[str]:
    """Instructions of the optimized HLO that multiply s8 operands (XLA's dot, or its YNNPACK fusion)."""
    shapes = {}
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (\S+) ", line)
        if not m:
            continue
        shapes[m.group(1)] = m.group(2)
        if " dot(" in line or "__ynn_fusion" in line:
            args = re.findall(r"%[\w.\-]+", line.split("(", 1)[1].split(")")[0])
            if args and all(shapes.get(a, "").startswith("s8[") for a in args):
                found.append(line.strip())
    return found


def test_xla_path_runs_an_s8_dot_for_the_input_gradient():
    with native.xla_kernels():
        hlo = jax.jit(lambda v: _dx(v, True)).lower(X).compile().as_text()
    dx_dots = [d for d in _int8_dots(hlo) if re.search(rf"= s32\[{M},{K}\]", d)]
    assert dx_dots, "the input-gradient dot is not an s8 x s8 dot"
    assert not re.search(rf"= s32\[{N},{K}\]|= s32\[{K},{N}\]", hlo)  # no int32 copy of the weight


@pytest.mark.skipif(native.backend() == "xla", reason="no native kernels on this machine")
def test_native_path_runs_the_native_gemm_for_the_input_gradient():
    fwd_only = str(jax.make_jaxpr(lambda v: qat_int8_matmul(v, W, XS, XZ, WS, jnp.int32(0), RANGE, RANGE, True))(X))
    both = str(jax.make_jaxpr(lambda v: _dx(v, True))(X))
    backward = both.count("jquant_gemm_s8") - fwd_only.count("jquant_gemm_s8")
    assert backward >= 1, "dx did not use the native int8 GEMM"
