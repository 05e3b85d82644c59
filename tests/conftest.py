"""Shared test setup: deterministic RNG helpers."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# torch's x86 int8 kernels (fbgemm) accumulate exactly in int32 only with VNNI; without it they use
# vpmaddubsw, whose pairwise u8 x s8 sums saturate at int16, so a few outputs differ from the exact integer
# result. Tests comparing jquant's exact int8 against torch's int8 runtime use this to pick their tolerance.
TORCH_INT8_EXACT = bool({"avx512_vnni", "avx_vnni"} & _cpu_flags())
