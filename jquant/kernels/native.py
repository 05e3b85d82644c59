"""Native CPU kernels (C++ through the XLA FFI): CPU detection, build, loading, and the ``ffi_call`` wrappers.

``backend()`` names what the integer kernels run on: ``"native-avx512vnni"`` (512-bit ``vpdpbusd``),
``"native-avxvnni"`` (256-bit ``vpdpbusd``), ``"native-avx2"`` (256-bit, exact int8 products with ``vpmaddwd``), or
``"xla"``.
``JQUANT_KERNELS=xla`` forces the XLA kernels, ``=native`` makes an unusable native library an error, ``=auto``
(default) falls back to XLA with one warning saying why. ``xla_kernels()`` forces the XLA form while tracing
(e.g. to ``jax.export`` a portable function).

The library is compiled from ``csrc/jquant_kernels.cc`` with the system C++ compiler (``$CXX``, else ``g++``)
against ``jax.ffi.include_dir()``, one library per instruction set (a library built for AVX-512 must never be
loaded on a CPU without it). ``make`` builds it at install time (``build_at_install()``); otherwise
the first use builds it (~20 s) into ``csrc/build/`` (or ``$XDG_CACHE_HOME/jquant`` when the package directory is
read-only), keyed by a hash of the source, flags and jax version.

Exporting: a function traced with the native kernels contains custom calls ``jquant_*``; ``jax.export`` refuses
them unless given ``export_safety_checks()``, and the process that loads it must have registered the targets
(``register()``). Trace under ``xla_kernels()`` for an artifact that runs anywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).parent / "csrc" / "jquant_kernels.cc"
ISA_FLAGS = {
    "avx512vnni": ["-DJQ_ISA_AVX512VNNI", "-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                   "-mavx512vnni"],
    "avxvnni": ["-DJQ_ISA_AVXVNNI", "-mavx2", "-mfma", "-mavxvnni"],
    "avx2": ["-DJQ_ISA_AVX2", "-mavx2", "-mfma"],
    "emu512": ["-DJQ_ISA_EMU512"],  # scalar stand-ins for the 512-bit paths: tests only (JQUANT_KERNELS_ISA)
}
CPU_FEATURES = {  # /proc/cpuinfo flag names each library needs
    "avx512vnni": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "fma"},
    "avxvnni": {"avx2", "fma", "avx_vnni"},
    "avx2": {"avx2", "fma"},
    "emu512": set(),
}
TARGETS = {"jquant_gemm_s8": "JqGemmS8", "jquant_weight_only_s8": "JqWeightOnlyS8",
           "jquant_weight_only_s4": "JqWeightOnlyS4"}
CXXFLAGS = ["-std=c++17", "-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]
ENV = "JQUANT_KERNELS"

_force_xla: contextvars.ContextVar[bool] = contextvars.ContextVar("jquant_force_xla", default=False)


@dataclass(frozen=True)
class _State:
    backend: str  # "native-<isa>" or "xla"
    reason: str | None  # why not native (None when native)
    library: Path | None = None


_STATE: _State | None = None
_REGISTERED: dict[str, Path] = {}  # isa -> library whose targets this process registered (XLA keeps them)


def _cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty when unknown, e.g. not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect_isa(flags: set[str] | None = None) -> str | None:
    """The best instruction set this CPU runs (``"avx512vnni"``, ``"avxvnni"``, ``"avx2"``) or None.

    ``JQUANT_KERNELS_ISA`` overrides the choice (for tests: ``emu512`` runs the 512-bit code paths with scalar
    stand-ins for the intrinsics on any x86-64 CPU); an ISA the CPU lacks is refused.
    """
    forced = os.environ.get("JQUANT_KERNELS_ISA")
    if flags is None and forced:
        if forced not in ISA_FLAGS:
            raise ValueError(f"JQUANT_KERNELS_ISA: expected one of {tuple(ISA_FLAGS)}, got {forced!r}")
        if not CPU_FEATURES[forced] <= _cpu_flags():
            return None
        return forced
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"):
        return None
    flags = _cpu_flags() if flags is None else flags
    for isa in ("avx512vnni", "avxvnni", "avx2"):
        if CPU_FEATURES[isa] <= flags:
            return isa
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _library_name(isa: str, cxx: str) -> str:
    h = hashlib.sha256()
    h.update(SOURCE.read_bytes())
    h.update(" ".join(CXXFLAGS + ISA_FLAGS[isa] + [cxx, jax.__version__]).encode())
    return f"libjquant_kernels-{isa}-{h.hexdigest()[:12]}.so"


def _build_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("JQUANT_KERNELS_BUILD_DIR"):
        dirs.append(Path(os.environ["JQUANT_KERNELS_BUILD_DIR"]))
    dirs.append(SOURCE.parent / "build")
    dirs.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jquant")
    return dirs


def build(isa: str | None = None, *, verbose: bool = False) -> Path:
    """Compile (if not built yet) the library for ``isa`` (default: this CPU's) and return its path.

    Concurrent builds (pytest workers) take a file lock; the library appears atomically.
    """
    isa = isa or detect_isa()
    if isa is None:
        raise RuntimeError("this CPU has neither AVX512-VNNI nor AVX2+FMA (or is not x86-64 Linux)")
    if not SOURCE.exists():
        raise RuntimeError(f"the kernel source {SOURCE} is missing")
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH to build the native kernels")
    name = _library_name(isa, cxx)
    errors = []
    for d in _build_dirs():
        lib = d / name
        if lib.exists():
            return lib
        try:
            d.mkdir(parents=True, exist_ok=True)
            with open(d / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if lib.exists():
                    return lib
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=d)
                os.close(fd)
                cmd = [cxx, *CXXFLAGS, *ISA_FLAGS[isa], "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
                if verbose:
                    print(" ".join(cmd), file=sys.stderr)
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if done.returncode != 0:
                    os.unlink(tmp)
                    raise RuntimeError(f"{cxx} failed building the native kernels:\n{done.stderr[-2000:]}")
                os.replace(tmp, lib)
                return lib
        except OSError as err:  # read-only directory: try the next one
            errors.append(f"{d}: {err}")
    raise RuntimeError("cannot write the native kernel library anywhere: " + "; ".join(errors))


def _load(isa: str) -> Path:
    import ctypes

    if isa in _REGISTERED:
        return _REGISTERED[isa]
    lib_path = build(isa)
    lib = ctypes.CDLL(str(lib_path))
    lib.jquant_kernels_isa.restype = ctypes.c_char_p
    built_for = lib.jquant_kernels_isa().decode()
    if built_for != isa:
        raise RuntimeError(f"{lib_path} was built for {built_for}, this CPU needs {isa}")
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    _REGISTERED[isa] = lib_path
    return lib_path


def _resolve() -> _State:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "native", "xla"):
        raise ValueError(f"{ENV}: expected 'auto', 'native' or 'xla', got {mode!r}")
    if mode == "xla":
        return _State("xla", f"{ENV}=xla")
    isa = detect_isa()
    reason = None
    if isa is None:
        reason = "the CPU has neither AVX512-VNNI nor AVX2+FMA"
    else:
        try:
            return _State(f"native-{isa}", None, _load(isa))
        except Exception as err:  # a missing compiler, a failed build or load: fall back, say why
            reason = f"{type(err).__name__}: {err}"
    if mode == "native":
        raise RuntimeError(f"{ENV}=native but the native CPU kernels cannot be used: {reason}")
    warnings.warn(f"jquant: native CPU kernels unavailable ({reason}); the XLA kernels run instead", RuntimeWarning,
                  stacklevel=3)
    return _State("xla", reason)


def _state() -> _State:
    global _STATE
    if _STATE is None:
        _STATE = _resolve()
    return _STATE


def register() -> bool:
    """Build/load the library and register its FFI targets (idempotent); True when native kernels are usable."""
    return _state().backend != "xla"


def backend() -> str:
    """What the integer kernels run on when traced now: ``"native-<isa>"`` (see ``detect_isa``) or ``"xla"``."""
    if _force_xla.get() or jax.default_backend() != "cpu":
        return "xla"
    return _state().backend


def use_native() -> bool:
    """Whether kernels traced now take the native path."""
    return backend() != "xla"


# Without VNNI (the AVX2 build) an exact int8 product costs about what an f32 FMA does; measured on a 2-core Zen 3,
# XLA's own s8 dot is then as fast or faster from ~64-128 rows, the native GEMM 2-3x faster below.
AVX2_GEMM_MAX_ROWS = 128


def use_native_gemm(rows: int) -> bool:
    """Whether a W8A8 GEMM with ``rows`` activation rows traced now takes the native path."""
    name = backend()
    if name == "xla":
        return False
    if name != "native-avx2":
        return True
    try:  # a symbolic row count (jax.export) that may be large: XLA's dot, as for many rows
        return bool(rows < AVX2_GEMM_MAX_ROWS)
    except Exception:
        return False


@contextlib.contextmanager
def xla_kernels() -> Iterator[None]:
    """Trace with the portable XLA kernels inside this block (e.g. for ``jax.export``).

    It acts at trace time: a function jitted earlier keeps the kernels it was traced with.
    """
    token = _force_xla.set(True)
    try:
        yield
    finally:
        _force_xla.reset(token)


def export_safety_checks() -> list[Any]:
    """``disabled_checks`` letting ``jax.export`` keep jquant's native custom calls (the loader must ``register()``)."""
    return [jax.export.DisabledSafetyCheck.custom_call(t) for t in TARGETS]


def _reset_for_tests() -> None:
    global _STATE
    _STATE = None


def _require() -> None:
    if not register():
        raise RuntimeError(f"jquant: the native CPU kernels are not available ({_state().reason})")


# ---- ffi_call wrappers ------------------------------------------------------------------------------------------
OUT_KINDS = {"int32": (0, jnp.int32), "float32": (1, jnp.float32), "uint8": (2, jnp.uint8), "int8": (3, jnp.int8)}


def _per_row(value: Any, rows_shape: tuple[int, ...], dtype: Any) -> jnp.ndarray:
    """A per-tensor or per-row value as the kernel's (1,) or (M,) vector.

    Concrete scalars stay one element; arrays are broadcast to the rows, so that under ``vmap`` a value computed
    per example becomes per row of the flattened batch (the kernel repeats an unbatched per-row vector over the
    batch).
    """
    if isinstance(value, int | float | np.number) or (isinstance(value, np.ndarray) and value.size == 1):
        return jnp.asarray(np.asarray(value, dtype).reshape(1))
    value = jnp.asarray(value, dtype)
    return jnp.broadcast_to(value.reshape(-1) if value.size > 1 else value.reshape(()), rows_shape).reshape(-1)


def gemm_s8(
    a: jnp.ndarray,
    packed: jnp.ndarray,
    col_sums: jnp.ndarray,
    *,
    n: int,
    a_zero_point: Any = 0,
    col_offset: Any = None,
    out: str = "int32",
    row_scale: Any = None,
    col_scale: Any = None,
    bias: Any = None,
    relu: bool = False,
    out_inv_scale: Any = 1.0,
    out_zero_point: Any = 0,
    qmin: int = 0,
    qmax: int = 255,
) -> jnp.ndarray:
    """``a (..., K)`` u8/s8 times the packed int8 weight ``(K, N)`` (layout ``"s8_k4"``), then the epilogue.

    Exact int32 sums ``acc = sum_k (a - a_zero_point) * w + col_offset[n]`` (``col_sums``: the weight's column sums
    ``sum_k w[k, n]``; ``a_zero_point`` per tensor or per row). ``out="int32"`` returns ``acc``; otherwise
    ``y = acc * (row_scale * col_scale[n]) (+ bias[n]) (max 0 if relu)`` as float32, or requantized
    ``clip(round(y * out_inv_scale) + out_zero_point, qmin, qmax)`` as uint8 / int8. ``row_scale`` per tensor or
    per row. Activations and per-row values may carry vmap batch dims; the weight and column vectors not.
    """
    _require()
    kind, dtype = OUT_KINDS[out]
    f32, i32 = jnp.float32, jnp.int32
    rows = a.shape[:-1]
    row_zp = _per_row(a_zero_point, rows, np.int32)
    row_scale = _per_row(1.0 if row_scale is None else row_scale, rows, np.float32)
    col_offset = jnp.zeros((n,), i32) if col_offset is None else jnp.broadcast_to(jnp.asarray(col_offset, i32), (n,))
    col_scale = jnp.ones((n,), f32) if col_scale is None else jnp.broadcast_to(jnp.asarray(col_scale, f32), (n,))
    has_bias = bias is not None
    bias = jnp.zeros((1,), f32) if bias is None else jnp.broadcast_to(jnp.asarray(bias, f32), (n,))
    out_q = jnp.stack([jnp.asarray(out_inv_scale, f32).reshape(()), jnp.asarray(out_zero_point, f32).reshape(())])
    call = jax.ffi.ffi_call("jquant_gemm_s8", jax.ShapeDtypeStruct(rows + (n,), dtype), vmap_method="expand_dims")
    return call(a, packed, jnp.asarray(col_sums, i32), row_zp, col_offset, row_scale, col_scale, bias, out_q,
                k=np.int64(a.shape[-1]), n=np.int64(n), out_kind=np.int64(kind), relu=bool(relu),
                has_bias=has_bias, qmin=np.int64(qmin), qmax=np.int64(qmax))


def weight_only(x: jnp.ndarray, packed: jnp.ndarray, scale: jnp.ndarray, *, n: int, bits: int,
                group_size: int | None) -> jnp.ndarray:
    """``x (..., K)`` f32/bf16 times the packed int8/int4 weight ``(K, N)`` with scales ``(G, N)``: f32 ``(..., N)``.

    ``group_size`` None means one group (per-channel scales). Activations are not quantized.
    """
    _require()
    target = {8: "jquant_weight_only_s8", 4: "jquant_weight_only_s4"}[bits]
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape[:-1] + (n,), jnp.float32),
                            vmap_method="expand_dims")
    return call(x, packed, scale.astype(jnp.float32), k=np.int64(x.shape[-1]), n=np.int64(n),
                group_size=np.int64(group_size or 0))


def build_at_install() -> None:
    """The Makefile's install step: build the library for this CPU now; report (not fail) when it cannot."""
    isa = detect_isa()
    if isa is None:
        print("jquant: no supported SIMD instruction set on this CPU; the XLA kernels will run", file=sys.stderr)
        return
    try:
        print(f"jquant: native kernels ({isa}) at {build(isa)}")
    except Exception as exc:  # the install goes on; the first use warns and runs XLA
        print(f"jquant: native kernels not built ({exc}); the XLA kernels will run", file=sys.stderr)
