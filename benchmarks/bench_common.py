"""Shared by the benchmark scripts: round-robin timing and the MLP 784-1024-1024-10 (weights in Flax layout).

Import it before torch: it lets torch's OpenMP workers sleep instead of spin-waiting after every call, which
would otherwise take the 2 cores from XLA's next call and distort every JAX timing in the same process.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def cpu_name() -> str:
    """The CPU model name (lscpu), for result tables."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def round_robin_ms(fns: dict, reps: int, warmup: int = 3) -> dict[str, list[float]]:
    """Wall times (ms) of each callable over ``reps`` rounds, measured round-robin so that load from other
    processes on a shared machine hits every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fns: dict, reps: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time (ms) of each callable (``round_robin_ms``)."""
    return {name: float(np.median(t)) for name, t in round_robin_ms(fns, reps, warmup).items()}


def dense_params(rng, n_in: int, n_out: int) -> dict:
    return {
        "w": jnp.asarray(rng.standard_normal((n_in, n_out)) / np.sqrt(n_in), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(n_out) * 0.01, jnp.float32),
    }


def mlp_params(rng) -> dict:
    return {
        "fc1": dense_params(rng, 784, 1024),
        "fc2": dense_params(rng, 1024, 1024),
        "fc3": dense_params(rng, 1024, 10),
    }


def mlp(params, x):
    h = jax.nn.relu(x @ params["fc1"]["w"] + params["fc1"]["b"])
    h = jax.nn.relu(h @ params["fc2"]["w"] + params["fc2"]["b"])
    return h @ params["fc3"]["w"] + params["fc3"]["b"]
