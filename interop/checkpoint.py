"""Load and save torch checkpoints as flat ``{name: ndarray | QuantizedTensor | str}`` dicts.

Formats: ``.safetensors``; ``.pt`` / ``.pth`` / ``.bin`` through ``torch.load(weights_only=True)`` only (a
pickle that needs other globals is refused, never loaded unrestricted); sharded checkpoints through their
index json (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``); a directory holding one of
those. Nested dicts (``{"state_dict": {...}}``) are flattened with ``.``. Converted eager quantized Linear
modules store ``(weight, bias)`` in ``<m>._packed_params._packed_params``: it comes back as
``<m>.weight`` (QuantizedTensor) and ``<m>.bias``. torch.dtype / torch.qscheme values come back as names.
``quint4x2`` tensors (4-bit embeddings) come back as uint4 records, one value per element; float-qparams
per-channel tensors keep their float zero points. ``None`` entries hold no data and are left out (a quantized
conv without bias stores ``<m>.bias = None``, an fp16 FX reference module ``<m>.weight_qscheme = None``): a file
and the in-memory state_dict it was saved from (:func:`state_dict_to_numpy`) give the same dict.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from interop._torch import require_torch
from interop.atomic import atomic_path
from interop.errors import CheckpointError, UnsafeCheckpointError
from interop.records import QuantizedTensor
from interop.safetensors_io import read_safetensors, write_safetensors
from interop.tensors import to_numpy, to_torch

Value = np.ndarray | QuantizedTensor | str
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_PACKED = "._packed_params._packed_params"


def load_torch_checkpoint(path: str | os.PathLike, *, progress: bool = False) -> dict[str, Value]:
    """Load a torch checkpoint file, shard index or checkpoint directory into a flat numpy dict.

    Values are numpy arrays (bf16 as ``ml_dtypes.bfloat16``, exact bits), :class:`QuantizedTensor`
    records for quantized tensors, or strings for torch dtype/qscheme entries. Raises CheckpointError
    (a ValueError) naming the file when it is missing, truncated, corrupted, or needs unsafe globals.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = _find_in_directory(path)
    if path.endswith(".index.json"):
        return _load_sharded(path, progress)
    return _load_file(path, progress)


def _load_file(path: str, progress: bool) -> dict[str, Value]:
    """One checkpoint file (a shard index is not a file here: shards never point at other indexes)."""
    if path.endswith(".safetensors"):
        tensors, _ = read_safetensors(path)
        return dict(tensors)
    if path.endswith(PICKLE_SUFFIXES):
        return _load_pickle(path, progress)
    raise CheckpointError(
        f"{path}: unknown checkpoint format; expected .safetensors, {'/'.join(PICKLE_SUFFIXES)}, "
        "a *.index.json shard index or a directory holding one"
    )


def _find_in_directory(directory: str) -> str:
    for name in INDEX_FILES + SINGLE_FILES:
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate
    raise CheckpointError(f"{directory}: directory holds none of {', '.join(INDEX_FILES + SINGLE_FILES)}")


def shard_files(index_path: str) -> dict[str, list[str]]:
    """``{shard path: [keys]}`` of a shard index, validated: ``weight_map`` must map names to file names
    inside the index's folder (no absolute paths, no ``..``, no symlinks leading out, no other index)."""
    try:
        with open(index_path) as fh:
            index = json.load(fh)
    except FileNotFoundError as err:
        raise CheckpointError(f"{index_path}: file not found") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index_path}: not a shard index (invalid JSON: {err})") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        got = type(weight_map).__name__ if isinstance(index, dict) and "weight_map" in index else "none"
        raise CheckpointError(
            f"{index_path}: not a shard index: 'weight_map' must be an object mapping tensor names to shard "
            f"files, got {got}"
        )
    base = os.path.realpath(os.path.dirname(os.path.abspath(index_path)))
    own = os.path.realpath(index_path)
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index_path}: weight_map[{key!r}] must be a shard file name, got {shard!r}")
        if not key:
            raise CheckpointError(f"{index_path}: weight_map has an empty tensor name (for shard {shard!r})")
        shard_path = os.path.realpath(os.path.join(base, shard))
        if os.path.isabs(shard) or os.path.commonpath([base, shard_path]) != base:
            raise CheckpointError(
                f"{index_path}: weight_map[{key!r}] = {shard!r} points outside the checkpoint folder {base}; "
                "shards must be files next to the index"
            )
        if shard_path == own or shard.endswith(".index.json"):
            raise CheckpointError(
                f"{index_path}: weight_map[{key!r}] = {shard!r} is a shard index itself; shards must be "
                ".safetensors or .bin/.pt files"
            )
        shards.setdefault(shard_path, []).append(key)
    return shards


def _load_sharded(index_path: str, progress: bool) -> dict[str, Value]:
    shards = shard_files(index_path)
    out: dict[str, Value] = {}
    for shard_path in _progress(sorted(shards), progress, "shards"):
        if not os.path.exists(shard_path):
            raise CheckpointError(f"{shard_path}: shard listed in {index_path} is missing")
        loaded = _load_file(shard_path, False)
        expected = shards[shard_path]
        missing = [k for k in expected if k not in loaded]
        if missing:
            raise CheckpointError(f"{shard_path}: keys listed in {index_path} are missing: {missing[:10]}")
        clash = [k for k in loaded if k in out]
        if clash:
            raise CheckpointError(f"{shard_path}: keys already loaded from another shard: {clash[:10]}")
        out.update(loaded)
    return out


def _load_pickle(path: str, progress: bool) -> dict[str, Value]:
    torch = require_torch("loading .pt/.bin checkpoints")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            # torch's own loader of quantized tensors uses TypedStorage and warns about it: not the user's business
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        match = re.search(r"GLOBAL ([\w.]+)", str(err))
        culprit = match.group(1) if match else "a global that is not an allowed weights-only type"
        if "Unsupported global" in str(err) or match:
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the pickle needs {culprit}, which torch.load(weights_only=True) "
                "does not allow. jquant never unpickles arbitrary code; re-save the checkpoint as a plain "
                "state_dict of tensors (torch.save(model.state_dict(), ...)) or as safetensors."
            ) from err
        raise CheckpointError(f"{path}: corrupted pickle checkpoint ({_first_line(err)})") from err
    except Exception as err:  # torch raises RuntimeError/EOFError/... for truncated or corrupted archives
        raise CheckpointError(f"{path}: truncated or corrupted torch checkpoint ({_first_line(err)})") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(obj)}")
    _check_memory(obj, path)
    return state_dict_to_numpy(obj, path, progress=progress)


# Converted tensors may share storages (tied weights); beyond this many bytes per byte of file it is refused.
_MAX_BYTES_PER_FILE_BYTE = 16


def _check_memory(obj: Mapping[str, Any], path: str) -> None:
    """Refuse before any copy: views larger than their storage, and a total far beyond the file size."""
    from interop.tensors import check_plain_tensor

    torch = require_torch()
    flat: dict[str, Any] = {}
    _flatten(obj, "", flat, path)
    total = 0
    for key, value in flat.items():
        if isinstance(value, torch.Tensor):
            check_plain_tensor(value, f"{path}:{key}")
            total += value.numel() * value.element_size()
    limit = _MAX_BYTES_PER_FILE_BYTE * os.path.getsize(path) + (64 << 20)
    if total > limit:
        raise CheckpointError(
            f"{path}: its tensors would take {total} bytes in memory, more than {_MAX_BYTES_PER_FILE_BYTE}x the "
            f"file size ({os.path.getsize(path)} bytes): many entries view the same storage. Save independent "
            "tensors (t.clone()) instead"
        )


def state_dict_to_numpy(
    state: Mapping[str, Any], source: str = "state_dict", *, progress: bool = False
) -> dict[str, Value]:
    """A live torch state_dict (nested dicts, packed quantized params) as the flat numpy dict that
    :func:`load_torch_checkpoint` returns for a file."""
    flat: dict[str, Any] = {}
    _flatten(state, "", flat, source)
    out: dict[str, Value] = {}
    for key, value in _progress(flat.items(), progress, "tensors"):
        is_plain = isinstance(value, np.ndarray | QuantizedTensor | str | np.generic)
        out[key] = value if is_plain else to_numpy(value, f"{source}:{key}")
    return out


def _flatten(
    obj: Any, prefix: str, out: dict[str, Any], path: str, origins: dict[str, str] | None = None, where: str = ""
) -> None:
    """Flatten nested dicts with ``.``; two entries that flatten to one name (``{"fc.weight": a, "fc":
    {"weight": b}}``) or an empty name are errors naming both entries."""
    origins = {} if origins is None else origins
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)
            if not isinstance(key, str) or not key:
                raise CheckpointError(
                    f"{path}: entry {where + f'[{key!r}]'} has an empty or non-string name; every state_dict "
                    "key must be a non-empty string"
                )
            _flatten(value, f"{prefix}.{key}" if prefix else key, out, path, origins, where + f"[{key!r}]")
    elif isinstance(obj, tuple) and len(obj) == 2 and f".{prefix}".endswith(_PACKED):
        module = f".{prefix}"[: -len(_PACKED)].lstrip(".")
        dot = "." if module else ""
        weight, bias = obj
        _put(out, origins, f"{module}{dot}weight", weight, where + "[0]", path)
        if bias is not None:
            _put(out, origins, f"{module}{dot}bias", bias, where + "[1]", path)
    elif obj is None:
        return  # no data: a bias-less quantized conv's bias, an fp16 reference module's weight_qscheme
    elif isinstance(obj, list | tuple):
        raise CheckpointError(
            f"{path}: entry {prefix!r} is {type(obj).__name__}, not a tensor; pass a state_dict of tensors"
        )
    else:
        _put(out, origins, prefix, obj, where, path)


def _put(out: dict[str, Any], origins: dict[str, str], name: str, value: Any, where: str, path: str) -> None:
    if name in out:
        raise CheckpointError(
            f"{path}: entries {origins[name]} and {where} both flatten to the name {name!r}; rename one of them"
        )
    out[name] = value
    origins[name] = where


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _progress(items: Any, enabled: bool, unit: str) -> Any:
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety; tqdm is optional
        return items
    return tqdm(items, unit=f" {unit}", leave=False)


def save_torch_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write a flat numpy/record dict as ``.safetensors`` or as a torch ``.pt``/``.bin`` state_dict.

    The write is atomic: a temporary file in the same directory replaces ``path`` only on success.
    safetensors cannot hold quantized tensors or strings: those need ``.pt``.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        bad = [k for k, v in state.items() if isinstance(v, QuantizedTensor | str)]
        if bad:
            raise CheckpointError(f"{path}: safetensors cannot store quantized tensors or names {bad[:5]}; use .pt")
        arrays = {k: np.asarray(v) for k, v in state.items()}
        with atomic_path(path) as tmp:
            write_safetensors(tmp, arrays)
        return
    if path.endswith(PICKLE_SUFFIXES):
        torch = require_torch("writing .pt checkpoints")
        tensors = {k: to_torch(v, k) for k, v in state.items()}
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated", category=UserWarning)
            torch.save(tensors, tmp)
        return
    raise CheckpointError(f"{path}: unknown torch checkpoint suffix; use .safetensors or .pt")
