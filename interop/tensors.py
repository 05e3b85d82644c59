"""Value conversion between torch and numpy, bit-exact (bf16/fp8 kept via ml_dtypes, quantized -> record)."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from interop._torch import require_torch
from interop.records import QuantizedTensor

# torch dtype name -> (numpy dtype to reinterpret the raw bits as, torch integer dtype of the same width)
_BIT_VIEWS = {
    "bfloat16": (ml_dtypes.bfloat16, "int16"),
    "float8_e4m3fn": (ml_dtypes.float8_e4m3fn, "uint8"),
    "float8_e5m2": (ml_dtypes.float8_e5m2, "uint8"),
}
_TORCH_QTYPE = {"int8": "qint8", "uint8": "quint8", "int32": "qint32", "uint4": "quint4x2"}
_JQUANT_QTYPE = {torch_name: name for name, torch_name in _TORCH_QTYPE.items()}
# torch's sub-byte quantized dtypes: ``int_repr()`` returns their bytes packed, low bits first, in storage order
_SUB_BYTE_BITS = {"quint4x2": 4, "quint2x4": 2}


def torch_dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def to_numpy(value: Any, key: str = "<value>") -> np.ndarray | QuantizedTensor | str:
    """Convert one state_dict value: tensor -> ndarray, quantized tensor -> QuantizedTensor,
    torch.dtype / torch.qscheme -> its name, python number -> 0-d ndarray."""
    torch = require_torch()
    if isinstance(value, torch.Tensor):
        check_plain_tensor(value, key)
        # clone: .numpy() on a view of the caller's tensor would make its storage non-resizable, and torch's
        # fake quants resize their scale buffers when a per-channel state_dict is loaded into them
        t = value.detach().cpu()
        if not t.is_quantized:
            t = t.clone()
        if t.is_quantized:
            return quantized_to_record(t, key)
        name = torch_dtype_name(t.dtype)
        if name in _BIT_VIEWS:
            np_dtype, int_name = _BIT_VIEWS[name]
            return t.contiguous().view(getattr(torch, int_name)).numpy().view(np_dtype)
        try:
            return t.numpy()
        except TypeError as err:
            raise TypeError(
                f"{key}: torch dtype {t.dtype} has no numpy equivalent; convert it (e.g. t.float()) before saving"
            ) from err
    if isinstance(value, torch.dtype | torch.qscheme):
        return torch_dtype_name(value)
    if isinstance(value, bool | int | float):
        return np.asarray(value)
    raise TypeError(
        f"{key}: unsupported checkpoint value of type {type(value).__name__}; a state_dict entry must be a tensor, "
        "a torch dtype / qscheme, a python number or None"
    )


def check_plain_tensor(t: Any, key: str = "<value>") -> None:
    """Refuse tensors that hold no plain dense data: meta (shape only), sparse and nested tensors, and views
    with more elements than their storage holds (``expand``ed or overlapping strides: materializing them
    would allocate far more memory than the checkpoint file holds)."""
    torch = require_torch()
    if t.is_nested:
        raise TypeError(f"{key}: is a nested tensor; only dense tensors can be converted (save t.unbind() parts)")
    if t.layout != torch.strided:
        raise TypeError(
            f"{key}: is a sparse tensor (layout {torch_dtype_name(t.layout)}); save it dense (t.to_dense())"
        )
    if t.device.type == "meta":
        raise TypeError(f"{key}: is a meta tensor (a shape without data); save the materialized tensor")
    bits = _SUB_BYTE_BITS.get(torch_dtype_name(t.dtype), 8 * t.element_size())
    if bits < 8 and not t.is_contiguous():
        # int_repr() of a sub-byte tensor returns its storage bytes whatever the strides: the order would be wrong
        raise TypeError(
            f"{key}: {t.dtype} tensor with strides {tuple(t.stride())} is not contiguous; torch packs sub-byte "
            "values in storage order, so only contiguous ones can be read. Save t.dequantize() requantized "
            "contiguously instead"
        )
    # quantized tensors too: torch's loader rebuilds them with the pickle's strides, so a zero stride expands
    # one stored value to any shape, and int_repr() / dequantize() would materialize every element
    held = t.untyped_storage().nbytes() * 8 - t.storage_offset() * bits
    if t.numel() * bits > max(held, 0):
        raise TypeError(
            f"{key}: shape {tuple(t.shape)} has {t.numel()} elements but its storage holds only "
            f"{max(held, 0) // bits} (an expanded or overlapping view, strides "
            f"{tuple(t.stride())}); refusing to materialize it. Save t.contiguous() (or t.clone()) instead"
        )


def quantized_to_record(t: Any, key: str = "<value>") -> QuantizedTensor:
    """A torch quantized tensor -> QuantizedTensor (exact int data and qparams). ``quint4x2`` (embeddings with
    ``float_qparams_weight_only_qconfig_4bit``) is unpacked to one uint4 value per uint8 element."""
    name = torch_dtype_name(t.dtype)
    dtype = _JQUANT_QTYPE.get(name)
    if dtype is None:
        raise TypeError(
            f"{key}: quantized dtype {t.dtype} has no jquant equivalent (qint8, quint8, qint32 and quint4x2 do); "
            "save t.dequantize() or requantize it to one of those"
        )
    qscheme = torch_dtype_name(t.qscheme())
    data = t.int_repr().numpy().copy()
    bits = _SUB_BYTE_BITS.get(name)
    if bits is not None:
        data = unpack_sub_byte(data, bits, tuple(t.shape))
    if qscheme.startswith("per_tensor"):
        scale = np.asarray(t.q_scale(), dtype=np.float64)
        zero_point = np.asarray(t.q_zero_point(), dtype=np.int64)
        axis = None
    else:
        scale = t.q_per_channel_scales().numpy().copy()
        zero_point = t.q_per_channel_zero_points().numpy().copy()
        axis = int(t.q_per_channel_axis())
    return QuantizedTensor(data, scale, zero_point, axis, qscheme, dtype)


def unpack_sub_byte(packed: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """torch's packed sub-byte bytes (``int_repr()`` of quint4x2 / quint2x4: low bits first) as one uint8
    value per element of ``shape``."""
    per_byte = 8 // bits
    flat = packed.reshape(-1).astype(np.uint8)
    parts = [(flat >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(-1)[: int(np.prod(shape))].reshape(shape)


def _pack_sub_byte(values: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`unpack_sub_byte`: flat bytes, low bits first, the last byte zero-padded."""
    per_byte = 8 // bits
    flat = np.asarray(values, np.uint8).reshape(-1)
    flat = np.concatenate([flat, np.zeros(-flat.size % per_byte, np.uint8)]).reshape(-1, per_byte)
    return np.bitwise_or.reduce(flat << (bits * np.arange(per_byte, dtype=np.uint8)), axis=1).astype(np.uint8)


def _sub_byte_to_torch(rec: QuantizedTensor, torch_dtype: Any, key: str) -> Any:
    """A quint4x2 tensor with the record's qparams and packed bytes (torch has no constructor from int data)."""
    torch = require_torch()
    bits = _SUB_BYTE_BITS[torch_dtype_name(torch_dtype)]
    data = np.asarray(rec.data)
    if data.size and (not np.issubdtype(data.dtype, np.integer) or data.min() < 0 or data.max() >= 1 << bits):
        raise TypeError(f"{key}: {rec.dtype} QuantizedTensor data must hold integers in [0, {(1 << bits) - 1}]")
    shape = tuple(data.shape)
    if rec.axis is None:
        qt = torch._empty_affine_quantized(
            shape, scale=float(rec.scale), zero_point=int(rec.zero_point), dtype=torch_dtype
        )
    else:
        qt = torch._empty_per_channel_affine_quantized(
            shape,
            scales=torch.from_numpy(np.array(rec.scale, copy=True)),
            zero_points=torch.from_numpy(np.array(rec.zero_point, copy=True)),
            axis=rec.axis,
            dtype=torch_dtype,
        )
    packed = torch.from_numpy(_pack_sub_byte(data, bits))
    torch.empty(0, dtype=torch.uint8).set_(qt.untyped_storage(), 0, tuple(packed.shape)).copy_(packed)
    return qt


def record_to_torch(rec: QuantizedTensor, key: str = "<value>") -> Any:
    """QuantizedTensor -> torch quantized tensor (inverse of :func:`quantized_to_record`; uint4 -> quint4x2)."""
    torch = require_torch()
    if rec.dtype not in _TORCH_QTYPE:
        raise TypeError(
            f"{key}: QuantizedTensor dtype {rec.dtype} has no torch quantized dtype ({', '.join(_TORCH_QTYPE)} "
            "have); store its dequantize() instead"
        )
    expected = getattr(torch, _TORCH_QTYPE[rec.dtype])
    if torch_dtype_name(expected) in _SUB_BYTE_BITS:
        return _sub_byte_to_torch(rec, expected, key)
    data = torch.from_numpy(np.asarray(rec.data, order="C"))
    if rec.axis is None:
        qt = torch._make_per_tensor_quantized_tensor(data, float(rec.scale), int(rec.zero_point))
    else:
        qt = torch._make_per_channel_quantized_tensor(
            data,
            torch.from_numpy(np.asarray(rec.scale, order="C")),
            torch.from_numpy(np.asarray(rec.zero_point, order="C")),
            rec.axis,
        )
    if qt.dtype != expected:
        raise TypeError(f"{key}: QuantizedTensor data dtype {rec.data.dtype} does not match qtype {rec.dtype}")
    return qt


def to_torch(value: Any, key: str = "<value>") -> Any:
    """Inverse of :func:`to_numpy`: ndarray (incl. bf16/fp8) -> tensor, record -> quantized tensor."""
    torch = require_torch()
    if isinstance(value, QuantizedTensor):
        return record_to_torch(value, key)
    if isinstance(value, str):
        if hasattr(torch, value) and isinstance(getattr(torch, value), torch.dtype | torch.qscheme):
            return getattr(torch, value)
        raise TypeError(f"{key}: string value {value!r} is not a torch dtype or qscheme name")
    arr = np.asarray(value)
    for name, (np_dtype, int_name) in _BIT_VIEWS.items():
        if arr.dtype == np_dtype:
            raw = np.asarray(arr, order="C").view(np.dtype(int_name))
            return torch.from_numpy(raw.copy()).view(getattr(torch, name))
    try:
        return torch.from_numpy(np.array(arr, copy=True, order="C"))
    except TypeError as err:
        raise TypeError(f"{key}: numpy dtype {arr.dtype} cannot be converted to torch") from err
