"""Quantized dtypes: names, integer ranges and storage dtypes.

Names follow torch (``"int8"``/``"qint8"``, ``"uint8"``/``"quint8"``, ...). A qtype is identified by a
canonical string so that specs stay hashable and readable.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

INT_RANGES: dict[str, tuple[int, int]] = {
    "int4": (-8, 7),
    "uint4": (0, 15),
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int16": (-32768, 32767),
    "uint16": (0, 65535),
    "int32": (-(2**31), 2**31 - 1),
}
FLOAT_QTYPES: dict[str, Any] = {
    "float8_e4m3fn": jnp.float8_e4m3fn,
    "float8_e5m2": jnp.float8_e5m2,
}
# Storage dtype of each integer qtype. int4/uint4 live in int8/uint8 until packed (see packing.py).
_STORAGE = {
    "int4": jnp.int8,
    "uint4": jnp.uint8,
    "int8": jnp.int8,
    "uint8": jnp.uint8,
    "int16": jnp.int16,
    "uint16": jnp.uint16,
    "int32": jnp.int32,
}
_ALIASES = {"qint8": "int8", "quint8": "uint8", "qint32": "int32", "quint4x2": "uint4", "qint4": "int4"}

QTYPES = tuple(INT_RANGES) + tuple(FLOAT_QTYPES)


def canonical_dtype(dtype: Any) -> str:
    """Return the canonical qtype name for a string, numpy/jax dtype or torch-style alias."""
    if isinstance(dtype, str):
        name = _ALIASES.get(dtype.removeprefix("torch."), dtype.removeprefix("torch."))
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in INT_RANGES and name not in FLOAT_QTYPES:
        raise ValueError(f"dtype: unknown quantized dtype {dtype!r}; allowed: {', '.join(QTYPES)}")
    return name


def is_float_qtype(dtype: Any) -> bool:
    return canonical_dtype(dtype) in FLOAT_QTYPES


def storage_dtype(dtype: Any) -> Any:
    """The jnp dtype that holds quantized values of ``dtype``."""
    name = canonical_dtype(dtype)
    return FLOAT_QTYPES[name] if name in FLOAT_QTYPES else _STORAGE[name]


def qrange(
    dtype: Any,
    quant_min: int | None = None,
    quant_max: int | None = None,
    reduce_range: bool = False,
) -> tuple[int, int]:
    """The integer range ``(quant_min, quant_max)`` as torch computes it.

    ``reduce_range`` halves both ends with floor division for the int8/uint8 defaults and for any custom
    range, and leaves the other default ranges alone, as torch does. A custom range must satisfy
    ``quant_min < quant_max`` inside the dtype's range.
    """
    name = canonical_dtype(dtype)
    if name in FLOAT_QTYPES:
        raise ValueError(f"dtype: {name} is a float qtype and has no integer range")
    lo, hi = INT_RANGES[name]
    if (quant_min is None) != (quant_max is None):
        raise ValueError("quant_min/quant_max: give both or neither")
    if quant_min is not None:
        quant_min, quant_max = int(quant_min), int(quant_max)
        if not quant_min < quant_max:
            raise ValueError(f"quant_min/quant_max: need quant_min < quant_max, got ({quant_min}, {quant_max})")
        if quant_min < lo or quant_max > hi:
            raise ValueError(
                f"quant_min/quant_max: ({quant_min}, {quant_max}) lies outside the {name} range ({lo}, {hi})"
            )
        lo, hi = quant_min, quant_max
    # torch halves only the 8-bit defaults and custom ranges; other default ranges ignore reduce_range.
    if reduce_range and (quant_min is not None or name in ("int8", "uint8")):
        lo, hi = lo // 2, hi // 2
    return lo, hi


def float_qtype_max(dtype: Any) -> float:
    """Largest finite value of a float8 qtype."""
    return float(jnp.finfo(FLOAT_QTYPES[canonical_dtype(dtype)]).max)
