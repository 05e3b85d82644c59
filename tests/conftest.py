"""Shared test setup: deterministic RNG helpers."""

import numpy as np
import pytest

from jquant.kernels.native import _cpu_flags


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# torch's x86 int8 kernels (fbgemm) accumulate exactly in int32 only with VNNI; without it they use
# vpmaddubsw, whose pairwise u8 x s8 sums saturate at int16, so a few outputs differ from the exact integer
# result. Tests comparing jquant's exact int8 against torch's int8 runtime use this to pick their tolerance.
TORCH_INT8_EXACT = bool({"avx512_vnni", "avx_vnni"} & _cpu_flags())  # /proc/cpuinfo flags, as the kernels read them
