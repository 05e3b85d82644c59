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
_TORCH_QTYPE = {"int8": "qint8", "uint8": "quint8", "int32": "qint32"}


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
            return quantized_to_record(t)
        name = torch_dtype_name(t.dtype)
        if name in _BIT_VIEWS:
            np_dtype, int_name = _BIT_VIEWS[name]
            return t.contiguous().view(getattr(torch, int_name)).numpy().view(np_dtype)
        try:
            return t.numpy()
        except TypeError as err:
            raise TypeError(f"{key}: torch dtype {t.dtype} has no numpy equivalent") from err
    if isinstance(value, torch.dtype | torch.qscheme):
        return torch_dtype_name(value)
    if isinstance(value, bool | int | float):
        return np.asarray(value)
    raise TypeError(f"{key}: unsupported checkpoint value of type {type(value).__name__}")


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
    if t.is_quantized:
        return
    held = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
    if t.numel() * t.element_size() > max(held, 0):
        raise TypeError(
            f"{key}: shape {tuple(t.shape)} has {t.numel()} elements but its storage holds only "
            f"{max(held, 0) // max(t.element_size(), 1)} (an expanded or overlapping view, strides "
            f"{tuple(t.stride())}); refusing to materialize it. Save t.contiguous() (or t.clone()) instead"
        )


def quantized_to_record(t: Any) -> QuantizedTensor:
    """A torch quantized tensor -> QuantizedTensor (exact int data and qparams)."""
    torch = require_torch()
    qscheme = torch_dtype_name(t.qscheme())
    data = t.int_repr().numpy().copy()
    if qscheme.startswith("per_tensor"):
        scale = np.asarray(t.q_scale(), dtype=np.float64)
        zero_point = np.asarray(t.q_zero_point(), dtype=np.int64)
        axis = None
    else:
        scale = t.q_per_channel_scales().numpy().copy()
        zero_point = t.q_per_channel_zero_points().numpy().copy()
        axis = int(t.q_per_channel_axis())
    dtype = {torch.qint8: "int8", torch.quint8: "uint8", torch.qint32: "int32"}.get(t.dtype)
    if dtype is None:
        raise TypeError(f"quantized dtype {t.dtype} is not supported (qint8, quint8, qint32 are)")
    return QuantizedTensor(data, scale, zero_point, axis, qscheme, dtype)


def record_to_torch(rec: QuantizedTensor) -> Any:
    """QuantizedTensor -> torch quantized tensor (inverse of :func:`quantized_to_record`)."""
    torch = require_torch()
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
    expected = getattr(torch, _TORCH_QTYPE[rec.dtype])
    if qt.dtype != expected:
        raise TypeError(f"QuantizedTensor data dtype {rec.data.dtype} does not match qtype {rec.dtype}")
    return qt


def to_torch(value: Any, key: str = "<value>") -> Any:
    """Inverse of :func:`to_numpy`: ndarray (incl. bf16/fp8) -> tensor, record -> quantized tensor."""
    torch = require_torch()
    if isinstance(value, QuantizedTensor):
        return record_to_torch(value)
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
