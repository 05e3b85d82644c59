"""choose_qparams against torch observers' qparams formula, exactly."""

import numpy as np
import pytest
import torch
from torch.ao.quantization import observer as tobs

import jquant

EPS = torch.finfo(torch.float32).eps


def _torch_qparams(min_val, max_val, dtype, qscheme, reduce_range=False, quant_min=None, quant_max=None):
    per_channel = qscheme.startswith("per_channel")
    cls = tobs.PerChannelMinMaxObserver if per_channel else tobs.MinMaxObserver
    obs = cls(
        dtype=getattr(torch, dtype),
        qscheme=getattr(torch, qscheme),
        reduce_range=reduce_range,
        quant_min=quant_min,
        quant_max=quant_max,
    )
    scale, zp = obs._calculate_qparams(torch.tensor(min_val), torch.tensor(max_val))
    return scale.numpy(), zp.numpy()


def _ranges(rng, n):
    lo = (rng.standard_normal(n) * 3).astype(np.float32)
    hi = (lo + np.abs(rng.standard_normal(n)) * 5).astype(np.float32)
    # edge cases: all zero, constant positive, constant negative, all-positive, all-negative, tiny range
    lo[:6] = [0.0, 2.0, -3.0, 0.5, -4.0, 1e-9]
    hi[:6] = [0.0, 2.0, -3.0, 7.0, -0.25, 2e-9]
    return lo, hi


CASES = [
    ("quint8", "per_tensor_affine"),
    ("qint8", "per_tensor_affine"),
    ("quint8", "per_tensor_symmetric"),
    ("qint8", "per_tensor_symmetric"),
    ("qint8", "per_channel_symmetric"),
    ("quint8", "per_channel_affine"),
    ("qint8", "per_channel_affine"),
    ("quint8", "per_channel_affine_float_qparams"),
]


@pytest.mark.parametrize("dtype,qscheme", CASES)
@pytest.mark.parametrize("reduce_range", [False, True])
def test_choose_qparams_equals_torch(rng, dtype, qscheme, reduce_range):
    if reduce_range and "symmetric" in qscheme and dtype == "quint8":
        with pytest.raises(NotImplementedError):
            _torch_qparams(np.float32(0), np.float32(1), dtype, qscheme, reduce_range)
        with pytest.raises(ValueError, match="reduce_range"):
            jquant.choose_qparams(0.0, 1.0, dtype=dtype, qscheme=qscheme, reduce_range=True)
        return
    lo, hi = _ranges(rng, 2000)
    if not qscheme.startswith("per_channel"):
        pairs = list(zip(lo[:200], hi[:200], strict=True))
    else:
        pairs = [(lo, hi)]
    for mn, mx in pairs:
        want_s, want_z = _torch_qparams(mn, mx, dtype, qscheme, reduce_range)
        s, z = jquant.choose_qparams(mn, mx, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range)
        assert np.array_equal(np.asarray(s).reshape(-1), want_s.reshape(-1).astype(np.float32))
        assert np.array_equal(np.asarray(z).reshape(-1), want_z.reshape(-1).astype(np.asarray(z).dtype))


@pytest.mark.parametrize("dtype,quant_min,quant_max", [("quint8", 0, 100), ("qint8", -50, 77), ("quint8", 0, 15)])
@pytest.mark.parametrize("qscheme", ["per_tensor_affine", "per_tensor_symmetric"])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_custom_ranges_equal_torch(rng, dtype, quant_min, quant_max, qscheme, reduce_range):
    if reduce_range and qscheme == "per_tensor_symmetric" and dtype == "quint8":
        return  # refused by both; covered above
    lo, hi = _ranges(rng, 100)
    for mn, mx in zip(lo, hi, strict=True):
        want_s, want_z = _torch_qparams(mn, mx, dtype, qscheme, reduce_range, quant_min, quant_max)
        s, z = jquant.choose_qparams(
            mn, mx, dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, reduce_range=reduce_range
        )
        assert float(s) == float(want_s[0]) and int(z) == int(want_z[0])


def test_unobserved_gives_unit_scale():
    s, z = jquant.choose_qparams(np.inf, -np.inf, dtype="uint8")
    assert float(s) == 1.0 and int(z) == 0


@pytest.mark.parametrize("dtype", ["int16", "uint16"])
def test_16_bit_ranges_equal_torch(rng, dtype):
    lo, hi = _ranges(rng, 50)
    for qscheme in ("per_tensor_affine", "per_tensor_symmetric"):
        for mn, mx in zip(lo, hi, strict=True):
            want_s, want_z = _torch_qparams(mn, mx, dtype, qscheme)
            s, z = jquant.choose_qparams(mn, mx, dtype=dtype, qscheme=qscheme)
            assert float(s) == float(want_s[0]) and int(z) == int(want_z[0])


def test_qrange_matches_torch_table():
    assert jquant.qrange("int8") == (-128, 127)
    assert jquant.qrange("qint8", reduce_range=True) == (-64, 63)
    assert jquant.qrange("quint8", reduce_range=True) == (0, 127)
    assert jquant.qrange("int4") == (-8, 7)
    assert jquant.qrange("uint16") == (0, 65535)
    assert jquant.qrange("int32") == (-(2**31), 2**31 - 1)
    # torch halves a custom range too
    obs = tobs.MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=200, reduce_range=True)
    s, z = obs._calculate_qparams(torch.tensor(-1.0), torch.tensor(1.0))
    js, jz = jquant.choose_qparams(-1.0, 1.0, dtype="uint8", quant_min=0, quant_max=200, reduce_range=True)
    assert float(js) == float(s) and int(jz) == int(z)
    assert jquant.qrange("uint8", 0, 200, reduce_range=True) == (0, 100)


def test_choose_qparams_under_vmap_equals_eager(rng):
    import jax

    lo, hi = _ranges(rng, 500)
    eager = jquant.choose_qparams(lo, hi, dtype="quint8")
    batched = jax.vmap(lambda a, b: jquant.choose_qparams(a, b, dtype="quint8"))(lo, hi)
    jitted = jax.jit(jax.vmap(lambda a, b: jquant.choose_qparams(a, b, dtype="quint8")))(lo, hi)
    for got in (batched, jitted):
        assert np.array_equal(np.asarray(got[0]), np.asarray(eager[0]))
        assert np.array_equal(np.asarray(got[1]), np.asarray(eager[1]))


def test_reduce_range_is_ignored_for_wide_default_ranges():
    assert jquant.qrange("int16", reduce_range=True) == (-32768, 32767)
    assert jquant.qrange("int16", -1000, 1000, reduce_range=True) == (-500, 500)
    obs = tobs.MinMaxObserver(dtype=torch.int16, reduce_range=True)
    s, z = obs._calculate_qparams(torch.tensor(-1.0), torch.tensor(3.0))
    js, jz = jquant.choose_qparams(-1.0, 3.0, dtype="int16", reduce_range=True)
    assert float(js) == float(s) and int(jz) == int(z)
