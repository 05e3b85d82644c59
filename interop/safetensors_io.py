"""safetensors files as numpy dicts (bf16 and fp8 kept bit-exact through ml_dtypes)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from interop._torch import require_safetensors
from interop.errors import CheckpointError

# safetensors dtype tags that numpy cannot name on its own: read their raw bytes and reinterpret
_RAW_DTYPES = {
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "BF16": ml_dtypes.bfloat16,
}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor of a safetensors file, and its string metadata.

    Raises CheckpointError naming the file when it is missing, truncated or has a corrupted header.
    """
    safetensors = require_safetensors()
    path = os.fspath(path)
    tensors: dict[str, np.ndarray] = {}
    try:
        with safetensors.safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            raw_keys = []
            for key in f.keys():
                if f.get_slice(key).get_dtype() in _RAW_DTYPES:
                    raw_keys.append(key)
                else:
                    tensors[key] = f.get_tensor(key)
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: file not found") from err
    except Exception as err:  # safetensors raises its own SafetensorError for truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    if raw_keys:
        tensors.update(_read_raw(path, raw_keys))
    return tensors, metadata


def _read_raw(path: str, keys: list[str]) -> dict[str, np.ndarray]:
    """Read tensors by header offsets (the header was already validated by safetensors)."""
    out = {}
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
        base = 8 + header_len
        for key in keys:
            info = header[key]
            start, end = info["data_offsets"]
            fh.seek(base + start)
            buf = fh.read(end - start)
            out[key] = np.frombuffer(buf, dtype=_RAW_DTYPES[info["dtype"]]).reshape(info["shape"]).copy()
    return out


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> None:
    """Write numpy arrays (bf16/fp8 included) to a safetensors file (not atomic: see interop.atomic)."""
    require_safetensors("writing safetensors files")
    from safetensors.numpy import save_file

    arrays: dict[str, Any] = {k: np.asarray(v, order="C") for k, v in tensors.items()}
    save_file(arrays, os.fspath(path), metadata=metadata)
