"""Native CPU kernels (XLA FFI): exactness vs numpy int64, agreement with the XLA kernels, the fallback,
jit / vmap / grad / export, and packed weights in checkpoints."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.kernels import (
    backend,
    dynamic_int8_conv,
    dynamic_int8_dot_general,
    int8_conv,
    int8_dot_general,
    int8_matmul,
    native,
    pack_conv_weight,
    pack_weight,
    packing,
    quantize_weight,
    weight_only_dot_general,
    xla_kernels,
)
from jquant.numerics.qparams import choose_qparams

DENSE = (((1,), (0,)), ((), ()))
RNG = np.random.default_rng(7)
NATIVE = backend().startswith("native")
needs_native = pytest.mark.skipif(not NATIVE, reason="the native CPU kernels do not run on this machine")


def _normal(*shape):
    return jnp.asarray(RNG.standard_normal(shape), jnp.float32)


def _ints(dtype, *shape):
    info = np.iinfo(dtype)
    return RNG.integers(info.min, int(info.max) + 1, shape).astype(dtype)


def _both(fn, *args):
    """``fn(*args)`` jitted with the native kernels and with the XLA kernels (fresh traces each)."""
    assert "jquant_" in str(jax.make_jaxpr(fn)(*args)), "the native kernels were not used"
    got = jax.jit(lambda *a: fn(*a))(*args)
    with xla_kernels():
        ref = jax.jit(lambda *a: fn(*a))(*args)
    return got, ref


@pytest.fixture
def all_native(monkeypatch):
    """No row-count routing to XLA (the AVX2 build hands large GEMMs to XLA by default)."""
    monkeypatch.setattr(native, "AVX2_GEMM_MAX_ROWS", 1 << 62)


@pytest.fixture
def fresh_state(monkeypatch):
    """Resolve the backend anew inside the test and restore the process's state afterwards."""
    saved = native._STATE
    native._reset_for_tests()
    yield monkeypatch
    native._STATE = saved


def test_packing_layouts_round_trip():
    for k, n in ((5, 3), (64, 48), (33, 17)):
        q8 = jnp.asarray(_ints(np.int8, k, n))
        np.testing.assert_array_equal(packing.unpack(packing.pack_s8_k4(q8), "s8_k4", k, n), q8)
        q4 = jnp.asarray(RNG.integers(-8, 8, (k, n)).astype(np.int8))
        np.testing.assert_array_equal(packing.unpack(packing.pack_s4_k8(q4), "s4_k8", k, n), q4)


@needs_native
@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (7, 33, 40), (13, 64, 16), (64, 256, 96)])
@pytest.mark.parametrize("adtype", [np.uint8, np.int8])
def test_gemm_int32_identical_to_numpy(m, k, n, adtype):
    a, w = _ints(adtype, m, k), _ints(np.int8, k, n)
    got = jax.jit(int8_matmul)(jnp.asarray(a), jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(got), a.astype(np.int64) @ w.astype(np.int64))


@needs_native
@pytest.mark.parametrize("act_dtype", ["uint8", "int8"])
def test_static_w8a8_epilogue_matches_xla(act_dtype):
    x, w, b = _normal(9, 70), _normal(70, 37), _normal(37)
    xs, xz = choose_qparams(x.min(), x.max(), dtype=act_dtype)
    qw = pack_weight(quantize_weight(w, axis=-1, contracting_axes=(0,)))
    assert qw.kernel_layout == "s8_k4"
    kw = dict(act_scale=xs, act_zero_point=xz, act_dtype=act_dtype, bias=b)
    got, ref = _both(lambda x, qw: int8_dot_general(x, qw, DENSE, **kw), x, qw)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    got, ref = _both(lambda x, qw: int8_dot_general(x, qw, DENSE, relu=True, out_scale=0.04, out_zero_point=3,
                                                    **kw), x, qw)
    assert got.dtype == ref.dtype == jnp.uint8
    assert np.abs(np.asarray(got, np.int32) - np.asarray(ref, np.int32)).max() <= 1  # one output step
    assert np.asarray(got).min() >= 3  # relu before requantization: nothing below the zero point


@needs_native
def test_prepacked_and_per_call_packing_agree_for_torch_layout():
    x, w = _normal(4, 32), _normal(16, 32)  # torch layout: contract axis 1 of the weight
    xs, xz = choose_qparams(x.min(), x.max(), dtype="uint8")
    dn = (((1,), (1,)), ((), ()))
    qw = quantize_weight(w, axis=0)
    packed = pack_weight(qw, (1,))
    f = jax.jit(lambda x, qw: int8_dot_general(x, qw, dn, act_scale=xs, act_zero_point=xz))
    np.testing.assert_array_equal(f(x, qw), f(x, packed))


@needs_native
@pytest.mark.parametrize("symmetric", [True, False])
def test_dynamic_w8a8_matches_xla(symmetric):
    x, w = _normal(6, 48), _normal(48, 20)
    qw = quantize_weight(w, axis=-1, contracting_axes=(0,))
    got, ref = _both(lambda x, qw: dynamic_int8_dot_general(x, qw, DENSE, per_token=symmetric, symmetric=symmetric),
                     x, qw)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


@needs_native
@pytest.mark.parametrize("dtype,group_size", [("int8", None), ("int8", 32), ("int4", 32), ("int4", None)])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_weight_only_is_exact_up_to_summation_order(dtype, group_size, x_dtype):
    k, n = 128, 40
    x, w = _normal(3, k).astype(x_dtype), _normal(k, n)
    qw = pack_weight(quantize_weight(w, dtype=dtype, axis=-1, group_size=group_size,
                                     group_axis=0 if group_size else None), (0,))
    assert "jquant_weight_only" in str(jax.make_jaxpr(lambda x, qw: weight_only_dot_general(x, qw, DENSE))(x, qw))
    got = jax.jit(lambda x, qw: weight_only_dot_general(x, qw, DENSE))(x, qw)
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(qw.dequantize(), np.float64)
    assert got.dtype == x_dtype
    tol = 1e-5 if x_dtype == jnp.float32 else 1e-2  # bf16 output rounding
    assert np.abs(np.asarray(got, np.float64) - ref).max() <= tol * np.abs(ref).max()
    if x_dtype == jnp.float32:  # (XLA's bf16 form rounds the dequantized weight to bf16: less exact than this)
        with xla_kernels():
            exact = jax.jit(lambda x, qw: weight_only_dot_general(x, qw, DENSE))(x, qw)
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-4)


@needs_native
def test_weight_only_auto_no_longer_quantizes_activations():
    x, w = _normal(2, 256), _normal(256, 64)
    qw = quantize_weight(w, axis=-1)
    auto = jax.jit(lambda x, qw: weight_only_dot_general(x, qw, DENSE))(x, qw)
    dyn = jax.jit(lambda x, qw: weight_only_dot_general(x, qw, DENSE, impl="dynamic"))(x, qw)
    ref = np.asarray(x @ qw.dequantize())
    assert np.abs(np.asarray(auto) - ref).max() < 1e-4
    assert np.abs(np.asarray(dyn) - ref).max() > 1e-3  # the opt-in dynamic path does round the activations


def _conv_case(groups: int):
    """An NHWC input with its uint8 qparams and an int8 per-channel kernel (packed when ungrouped)."""
    x, w = _normal(2, 9, 10, 6), _normal(3, 3, 6 // groups, 8)
    dn = ("NHWC", "HWIO", "NHWC")
    xs, xz = choose_qparams(x.min(), x.max(), dtype="uint8")
    qw = quantize_weight(w, axis=-1)
    if groups == 1:
        qw = pack_conv_weight(qw, dn)
        assert qw.kernel_data is not None
    return x, qw, dn, xs, xz


@needs_native
@pytest.mark.parametrize("groups,strides,padding,dilation", [(1, (1, 1), "SAME", (1, 1)), (1, (2, 2), "VALID", (2, 2)),
                                                             (2, (1, 2), ((1, 2), (0, 1)), (1, 1))])
def test_conv_nhwc_matches_xla(groups, strides, padding, dilation, all_native):
    x, qw, dn, xs, xz = _conv_case(groups)

    def f(x, qw):
        return int8_conv(x, qw, strides, padding, None, dilation, dn, groups, act_scale=xs, act_zero_point=xz,
                         bias=jnp.arange(8.0) / 10)

    got, ref = _both(f, x, qw)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5)
    dyn, dyn_ref = _both(lambda x, qw: dynamic_int8_conv(x, qw, strides, padding, None, dilation, dn, groups), x, qw)
    np.testing.assert_allclose(dyn, dyn_ref, rtol=1e-6, atol=1e-5)


@needs_native
@pytest.mark.parametrize("groups,out_dtype", [(1, "uint8"), (2, "int8"), (1, "int4")])
def test_conv_requantizing_epilogue_matches_xla(groups, out_dtype, all_native):
    """ConvReLU with a float bias, requantized to the next op's integers inside the GEMM (int4: the GEMM writes
    float32, XLA requantizes): the same integers as the XLA path, up to a tie moved by float rounding."""
    x, qw, dn, xs, xz = _conv_case(groups)

    def f(x, qw):
        return int8_conv(x, qw, (1, 1), "SAME", None, None, dn, groups, act_scale=xs, act_zero_point=xz,
                         bias=jnp.linspace(-1.0, 1.0, 8), bias_int32=False, relu=True, out_scale=0.05,
                         out_zero_point=-3 if out_dtype != "uint8" else 7, out_dtype=out_dtype)

    got, ref = _both(f, x, qw)
    assert got.dtype == ref.dtype == jnp.dtype(jnp.uint8 if out_dtype == "uint8" else jnp.int8)
    diff = np.abs(np.asarray(got, np.int32) - np.asarray(ref, np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
    assert len(np.unique(np.asarray(got))) > 8  # a real spread of values, not a clamped constant


@needs_native
def test_vmap_over_activations(all_native):
    x, w = _normal(3, 5, 40), _normal(40, 24)
    qw = pack_weight(quantize_weight(w, axis=-1, contracting_axes=(0,)))
    f = lambda v: int8_dot_general(v, qw, DENSE, act_scale=0.05, act_zero_point=128)
    np.testing.assert_array_equal(jax.jit(jax.vmap(f))(x), jax.jit(f)(x.reshape(15, 40)).reshape(3, 5, 24))
    q4 = pack_weight(quantize_weight(w, dtype="int4", axis=-1, group_size=8, group_axis=0), (0,))
    g = lambda v: weight_only_dot_general(v, q4, DENSE)
    np.testing.assert_allclose(jax.jit(jax.vmap(g))(x), jax.jit(g)(x.reshape(15, 40)).reshape(3, 5, 24), rtol=1e-6)
    d = lambda v: dynamic_int8_dot_general(v, qw, DENSE)
    np.testing.assert_array_equal(jax.jit(jax.vmap(d))(x), jax.jit(d)(x.reshape(15, 40)).reshape(3, 5, 24))


@needs_native
def test_grad_weight_only_and_qat_int8_forward():
    from jquant.transform.int8_qat import qat_int8_matmul

    x, w = _normal(4, 32), _normal(32, 16)
    qw = pack_weight(quantize_weight(w, dtype="int4", axis=-1, group_size=16, group_axis=0), (0,))

    def loss(x, scale):
        return jnp.sum(jnp.sin(weight_only_dot_general(x, qw.__class__(**{**qw.__dict__, "scale": scale}), DENSE)))

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, qw.scale)
    with xla_kernels():
        ref = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, qw.scale)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-3)  # float summation order differs

    args = (x, w, jnp.float32(0.03), jnp.int32(128), jnp.full((16,), 0.02, jnp.float32), jnp.int32(0), (0, 255),
            (-127, 127))
    qat = lambda x, w: jnp.sum(qat_int8_matmul(*(x, w), *args[2:]) ** 2)
    got_v, got_g = jax.jit(jax.value_and_grad(qat, argnums=(0, 1)))(x, w)
    with xla_kernels():
        ref_v, ref_g = jax.jit(jax.value_and_grad(qat, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(got_v, ref_v, rtol=1e-6)
    for g, r in zip(got_g, ref_g, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@needs_native
def test_export_portable_and_native(tmp_path):
    from jquant.transform.serialize import export_int_fn, load_exported, load_int_params, save_int_params

    x, w = _normal(2, 64), _normal(64, 32)
    params = {"w": pack_weight(quantize_weight(w, axis=-1, contracting_axes=(0,)))}
    fn = lambda p, v: int8_dot_general(v, p["w"], DENSE, act_scale=0.05, act_zero_point=128)
    with pytest.raises(ValueError, match="jquant_gemm_s8"):  # jax refuses the custom call without the checks
        jax.export.export(jax.jit(fn))(params, x)
    portable = load_exported(export_int_fn(fn, params, x))
    assert "jquant_" not in portable.exported.mlir_module()
    kept = load_exported(export_int_fn(fn, params, x, native_kernels=True))
    assert "jquant_gemm_s8" in kept.exported.mlir_module()
    expected = jax.jit(fn)(params, x)
    np.testing.assert_allclose(portable(params, x), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(kept(params, x), expected)
    save_int_params(tmp_path / "p.safetensors", params)  # the packed copy round-trips
    loaded = load_int_params(tmp_path / "p.safetensors")
    assert loaded["w"].kernel_layout == "s8_k4"
    np.testing.assert_array_equal(loaded["w"].kernel_data, params["w"].kernel_data)


def test_env_forces_xla(fresh_state):
    fresh_state.setenv("JQUANT_KERNELS", "xla")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend() == "xla"
    qw = quantize_weight(_normal(16, 8), axis=-1)
    assert pack_weight(qw, (0,)) is qw  # no second copy when the native kernels are off
    jaxpr = str(jax.make_jaxpr(lambda x: int8_dot_general(x, qw, DENSE, act_scale=0.1))(_normal(2, 16)))
    assert "ffi_call" not in jaxpr


def test_cpu_without_instructions_warns_once_and_runs_xla(fresh_state):
    fresh_state.delenv("JQUANT_KERNELS", raising=False)
    fresh_state.delenv("JQUANT_KERNELS_ISA", raising=False)
    fresh_state.setattr(native, "_cpu_flags", lambda: {"sse2"})
    x, w = _normal(3, 16), _normal(16, 8)
    qw = quantize_weight(w, axis=-1)
    with pytest.warns(RuntimeWarning, match="neither AVX512-VNNI nor AVX2"):
        assert backend() == "xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        y = int8_dot_general(x, qw, DENSE, act_scale=0.05)
    with xla_kernels():
        np.testing.assert_array_equal(y, int8_dot_general(x, qw, DENSE, act_scale=0.05))


def test_missing_library_warns_and_native_mode_raises(fresh_state):
    fresh_state.delenv("JQUANT_KERNELS", raising=False)
    fresh_state.delenv("JQUANT_KERNELS_ISA", raising=False)
    fresh_state.setattr(native, "_cpu_flags", lambda: {"avx2", "fma"})
    fresh_state.setattr(native, "_REGISTERED", {})

    def no_library(isa=None, **kw):
        raise RuntimeError("simulated: no C++ compiler")

    fresh_state.setattr(native, "build", no_library)
    with pytest.warns(RuntimeWarning, match="simulated: no C\\+\\+ compiler"):
        assert backend() == "xla"
    native._reset_for_tests()
    fresh_state.setenv("JQUANT_KERNELS", "native")
    with pytest.raises(RuntimeError, match="JQUANT_KERNELS=native"):
        backend()
    native._reset_for_tests()
    fresh_state.setenv("JQUANT_KERNELS", "fast")
    with pytest.raises(ValueError, match="JQUANT_KERNELS"):
        backend()


@pytest.mark.skipif(native.detect_isa() != "avx2", reason="the 512-bit paths run natively here (or nothing does)")
def test_512_bit_code_paths_in_emulation():
    """On an AVX2-only machine, run the 16-lane code paths (tile shapes, nibble table) with scalar stand-ins."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "JQUANT_KERNELS_ISA": "emu512", "JQUANT_KERNELS": "native"}
    cases = "gemm_int32 or static_w8a8 or weight_only_is_exact or conv_nhwc and not VALID"
    done = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:warnings", "-p", "no:xdist",
                           __file__, "-k", cases], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "passed" in done.stdout and "skipped" not in done.stdout


def test_isa_detection():
    assert native.detect_isa({"avx2", "fma"}) in ("avx2", None)  # None off x86-64 Linux
    assert native.detect_isa({"avx2", "fma", "avx_vnni"}) in ("avxvnni", None)
    full = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}
    assert native.detect_isa(full) in ("avx512vnni", None)
    assert native.detect_isa({"sse2"}) is None


def test_avx2_routes_large_gemms_to_xla(monkeypatch):
    monkeypatch.setattr(native, "backend", lambda: "native-avx2")
    assert native.use_native_gemm(8) and not native.use_native_gemm(native.AVX2_GEMM_MAX_ROWS)
    monkeypatch.setattr(native, "backend", lambda: "native-avx512vnni")
    assert native.use_native_gemm(1 << 20)


def test_xla_path_of_matmul_stays_exact():
    """The pure-XLA form (what non-native machines and portable exports run) is exact too."""
    a, w = _ints(np.int8, 5, 24), _ints(np.int8, 24, 7)
    with xla_kernels():
        jaxpr = str(jax.make_jaxpr(int8_matmul)(jnp.asarray(a), jnp.asarray(w)))
        got = jax.jit(int8_matmul)(jnp.asarray(a), jnp.asarray(w))
    assert "ffi_call" not in jaxpr
    np.testing.assert_array_equal(got, a.astype(np.int64) @ w.astype(np.int64))
