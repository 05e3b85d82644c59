"""Shared test setup: deterministic RNG helpers."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
