"""Quantization parameters of torch checkpoints as a neutral table, both ways.

A :class:`QParamRecord` holds the qparams of one tensor of one torch module: ``table[module][role]``
with role ``"weight"``, ``"input"`` or ``"output"``. Readers (``read_torch_qparams``) recognise:

* eager QAT (``prepare_qat``): ``<m>.weight_fake_quant.*`` (role weight) and
  ``<m>.activation_post_process.*`` (role output of ``<m>``), for FakeQuantize and
  FusedMovingAvgObsFakeQuantize: ``scale``/``zero_point`` as stored, observer ``min_val``/``max_val``.
  FX-prepared observers at the root (``activation_post_process_0``) are named by themselves, role output;
* FX reference modules (``convert_to_reference_fx``): ``<m>.weight_scale``, ``<m>.weight_zero_point``,
  ``<m>.weight_axis``, ``<m>.weight_qscheme``, ``<m>.weight_dtype``; activation qparams
  ``<node>_input_scale_0`` (role input) and ``<node>_scale_0`` (role output), named by the FX node;
* converted eager quantized modules: quantized ``<m>.weight`` (packed Linear params included, see
  :func:`interop.load_torch_checkpoint`), output ``<m>.scale``/``<m>.zero_point``;
* torchao tensor subclasses through their flattened safetensors (``<m>._weight_qdata``,
  ``<m>._weight_scale``, optional ``<m>._weight_zero_point``, JSON metadata per tensor), read
  without importing torchao;
* gpt-fast weight-only int8: ``<m>.weight`` int8 (out, in) and ``<m>.scales`` (out,).

The state_dict of a QAT model does not hold the dtype, qscheme or integer range: pass the torch
``model`` to read them from its fake-quant modules, else torch's defaults are assumed (weights int8
symmetric, per channel when there are several scales, range -128..127; activations uint8 affine
0..255) and the record lists those fields in ``inferred``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from interop.errors import InteropError
from interop.records import QuantizedTensor
from jquant.numerics.qschemes import canonical_qscheme, is_per_channel
from jquant.numerics.qtypes import INT_RANGES, canonical_dtype

ROLES = ("weight", "input", "output")


@dataclass(frozen=True, eq=False)
class QParamRecord:
    """Qparams of one tensor (``role``) of one torch module, with torch's storage dtypes kept.

    ``producer`` / ``consumers`` describe the torch data flow when the torch model (or its FX graph) was
    given to the reader: the torch op whose output this record quantizes (a module path, an FX node name such
    as ``add``, or ``input:<name>`` for a graph input) and the ops that consume the quantized value (through
    value-preserving ops: relu, flatten, reshape, max-pool, dequantize, cat's shared qparams). ``None``:
    no graph was available.
    """

    module: str
    role: str
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    dtype: str
    qscheme: str
    quant_min: int
    quant_max: int
    source: str
    block_size: tuple[int, ...] | None = None
    min_val: np.ndarray | None = None
    max_val: np.ndarray | None = None
    qdata: np.ndarray | None = None
    torch_keys: tuple[str, ...] = ()
    inferred: tuple[str, ...] = field(default=())
    producer: str | None = None
    consumers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: {self.role!r} is not one of {ROLES} (module {self.module!r})")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "qscheme", canonical_qscheme(self.qscheme))

    def equals(self, other: QParamRecord) -> bool:
        """Exact equality of every field (arrays by value and dtype)."""

        def same(a, b):
            if a is None or b is None:
                return a is b
            a, b = np.asarray(a), np.asarray(b)
            return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)

        arrays = ("scale", "zero_point", "min_val", "max_val", "qdata")
        plain = ("module", "role", "axis", "dtype", "qscheme", "quant_min", "quant_max", "block_size")
        return all(getattr(self, f) == getattr(other, f) for f in plain) and all(
            same(getattr(self, f), getattr(other, f)) for f in arrays
        )


QParamTable = dict[str, dict[str, QParamRecord]]


def _key_for(rec: QParamRecord, part: str) -> str:
    keys = [k for k in rec.torch_keys if part in k.rsplit(".", 1)[-1]]
    keys = keys or [k for k in rec.torch_keys if k.endswith(("weight", "_packed_weight"))] or list(rec.torch_keys)
    return keys[0] if keys else f"{rec.module} ({rec.role})"


def validate_record(rec: QParamRecord) -> None:
    """Raise InteropError (naming the torch key) for qparams torch or jquant cannot use: a scale that is not
    a positive, finite, normal float32 number, or a zero point outside ``[quant_min, quant_max]`` (checked
    before any cast, so an int64 ``2**40`` cannot wrap to 0); float zero points (float-qparams) must be finite."""
    where = f"torch {rec.module or '<root>'} ({rec.role}, {rec.source})"
    scale = np.asarray(rec.scale)
    if scale.size == 0:
        raise InteropError(f"{_key_for(rec, 'scale')}: {where} has no scale values")
    if not (np.issubdtype(scale.dtype, np.floating) or np.issubdtype(scale.dtype, np.integer)):
        raise InteropError(f"{_key_for(rec, 'scale')}: {where} scale has dtype {scale.dtype}, not a float")
    s64 = scale.astype(np.float64).reshape(-1)
    s32 = scale.astype(np.float32).reshape(-1) if np.all(np.isfinite(s64)) else s64
    tiny = float(np.finfo(np.float32).tiny)
    bad = ~np.isfinite(s64) | (s64 <= 0) | ~np.isfinite(s32) | (np.abs(s32) < tiny)
    if bad.any():
        i = int(np.argmax(bad))
        v = float(s64[i])
        what = (
            "NaN"
            if np.isnan(v)
            else "infinite"
            if not np.isfinite(v) or not np.isfinite(s32[i])
            else "zero"
            if v == 0
            else "negative"
            if v < 0
            else f"subnormal in float32 (below {tiny:.3g}; XLA flushes it to zero)"
        )
        at = f" at index {i}" if s64.size > 1 else ""
        raise InteropError(
            f"{_key_for(rec, 'scale')}: {where} scale{at} is {v!r}, {what}; a scale must be a positive, finite, "
            "normal float32 number. Recalibrate this module in torch (or fix the value) before importing"
        )
    zp = np.asarray(rec.zero_point)
    zkey = _key_for(rec, "zero_point")
    if rec.qscheme == "per_channel_affine_float_qparams" or (
        np.issubdtype(zp.dtype, np.floating) and rec.qscheme.endswith("float_qparams")
    ):
        if not np.all(np.isfinite(zp)):
            raise InteropError(f"{zkey}: {where} has a non-finite float zero point; recalibrate this module")
        return
    if np.issubdtype(zp.dtype, np.floating):
        flat = zp.astype(np.float64).reshape(-1)
        if not np.all(np.isfinite(flat)) or not np.array_equal(flat, np.round(flat)):
            i = int(np.argmax(~np.isfinite(flat) | (flat != np.round(flat))))
            raise InteropError(
                f"{zkey}: {where} zero point {float(flat[i])!r} is not an integer but qscheme {rec.qscheme} needs one"
            )
    elif not np.issubdtype(zp.dtype, np.integer) and zp.dtype != np.bool_:
        raise InteropError(f"{zkey}: {where} zero point has dtype {zp.dtype}, not an integer")
    flat = zp.reshape(-1)
    lo, hi = rec.quant_min, rec.quant_max
    out = (flat < lo) | (flat > hi)
    if out.any():
        i = int(np.argmax(out))
        at = f" at index {i}" if flat.size > 1 else ""
        how = "inferred " if {"dtype", "quant_min"} & set(rec.inferred) else ""
        hint = (
            "pass model= (the torch module) so the real dtype and range are read"
            if how
            else "fix the checkpoint or recalibrate this module"
        )
        raise InteropError(
            f"{zkey}: {where} zero point{at} is {int(flat[i]) if flat.dtype.kind in 'iu' else float(flat[i])!r} "
            f"({flat.dtype}), outside the {how}{rec.dtype} range [{lo}, {hi}]; {hint}"
        )


def _add(table: QParamTable, rec: QParamRecord) -> None:
    validate_record(rec)
    slot = table.setdefault(rec.module, {})
    if rec.role in slot:
        raise InteropError(
            f"module {rec.module!r}: two {rec.role} qparam sets ({slot[rec.role].torch_keys} and {rec.torch_keys})"
        )
    slot[rec.role] = rec


def _quint4x2_record(t: Any) -> QuantizedTensor:
    """A torch ``quint4x2`` tensor (two 4-bit values per byte, low nibble first, as ``int_repr()`` packs
    them) as an unpacked uint4 QuantizedTensor (per-channel float qparams: embeddings)."""
    packed = t.int_repr().numpy().reshape(-1)
    data = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[: t.numel()].reshape(tuple(t.shape))
    qscheme = str(t.qscheme()).removeprefix("torch.")
    if qscheme.startswith("per_tensor"):
        scale, zp, axis = np.asarray(t.q_scale(), np.float64), np.asarray(t.q_zero_point(), np.int64), None
    else:
        scale = t.q_per_channel_scales().numpy().copy()
        zp = t.q_per_channel_zero_points().numpy().copy()
        axis = int(t.q_per_channel_axis())
    return QuantizedTensor(data.astype(np.uint8), scale, zp, axis, qscheme, "uint4")


def _as_arrays(state: Mapping[str, Any]) -> dict[str, Any]:
    """The state_dict as numpy; what the generic loader does not take is handled here: ``quint4x2`` tensors
    (unpacked to uint4 records) and the ``None`` qscheme of fp16 reference modules (dropped: an fp16 weight
    is a cast, it has no qparams)."""
    from interop.checkpoint import state_dict_to_numpy

    pre: dict[str, Any] = {}
    for key, value in state.items():
        if value is None and isinstance(key, str) and key.endswith("weight_qscheme"):
            continue
        if getattr(value, "dtype", None) is not None and str(value.dtype) == "torch.quint4x2":
            value = _quint4x2_record(value)
        pre[key] = value
    return state_dict_to_numpy(pre)


def read_torch_qparams(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    model: Any = None,
    metadata: Mapping[str, str] | None = None,
) -> QParamTable:
    """Read every qparam set of a torch checkpoint (path) or state_dict into ``{module: {role: record}}``.

    ``model``: the torch module the state_dict comes from (QAT: its fake-quant modules give dtype,
    qscheme and range). ``metadata``: safetensors metadata when passing a torchao flattened dict.
    """
    if isinstance(source, str | os.PathLike):
        from interop.checkpoint import load_torch_checkpoint
        from interop.safetensors_io import read_safetensors

        path = os.fspath(source)
        state = load_torch_checkpoint(path)
        if path.endswith(".safetensors") and metadata is None:
            metadata = read_safetensors(path)[1]
    else:
        state = _as_arrays(source)
    table: QParamTable = {}
    used: set[str] = set()
    _read_eager_qat(state, model, table, used)
    _read_fx_reference(state, model, table, used)
    _read_torchao(state, metadata or {}, table, used)
    _read_converted(state, model, table, used)
    _read_gpt_fast(state, table, used)
    if model is not None:
        from interop.qgraph import annotate_flow

        table = annotate_flow(table, model)
    # keep the state_dict (= module registration) order: the site links rely on it
    position = {key: i for i, key in enumerate(state)}

    def first(module: str) -> int:
        return min(
            (position.get(k, len(position)) for r in table[module].values() for k in r.torch_keys),
            default=len(position),
        )

    return {module: table[module] for module in sorted(table, key=first)}


def _fq_config(
    model: Any, path: str, role: str, scale: np.ndarray, zero_point: Any = None
) -> tuple[dict, tuple[str, ...]]:
    if model is not None:
        try:
            fq = model.get_submodule(path)
        except AttributeError as err:
            raise InteropError(f"model: has no fake-quant module {path!r} named in the state_dict") from err
        per_channel = "per_channel" in str(fq.qscheme)
        return {
            "dtype": _qtype_name(str(fq.dtype)),
            "qscheme": str(fq.qscheme),
            "quant_min": int(fq.quant_min),
            "quant_max": int(fq.quant_max),
            "axis": int(fq.ch_axis) if per_channel else None,
        }, ()
    inferred = ("dtype", "qscheme", "quant_min", "quant_max", "axis")
    if zero_point is not None and np.issubdtype(np.asarray(zero_point).dtype, np.floating):
        # torch's fake quants store int32 zero points except for float-qparams (embeddings)
        cfg = {
            "dtype": "uint8",
            "qscheme": "per_channel_affine_float_qparams",
            "quant_min": 0,
            "quant_max": 255,
            "axis": 0 if np.size(scale) > 1 else None,
        }
    elif role == "weight":
        per_channel = scale.size > 1
        cfg = {
            "dtype": "int8",
            "qscheme": "per_channel_symmetric" if per_channel else "per_tensor_symmetric",
            "quant_min": -128,
            "quant_max": 127,
            "axis": 0 if per_channel else None,
        }
    else:
        cfg = {"dtype": "uint8", "qscheme": "per_tensor_affine", "quant_min": 0, "quant_max": 255, "axis": None}
    if cfg["axis"] is None and "per_channel" in cfg["qscheme"]:
        cfg["axis"] = 0
    return cfg, inferred


def _qtype_name(name: str) -> str:
    return canonical_dtype(name.removeprefix("torch."))


def _read_eager_qat(state, model, table, used) -> None:
    for key in [k for k in state if k.endswith("fake_quant_enabled")]:
        prefix = key[: -len("fake_quant_enabled")].rstrip(".")
        dot = f"{prefix}." if prefix else ""
        scale_key, zp_key = f"{dot}scale", f"{dot}zero_point"
        if scale_key not in state or zp_key not in state:
            raise InteropError(f"{key}: fake-quant buffers without {scale_key!r}/{zp_key!r}")
        parts = prefix.split(".")
        if parts[-1] == "weight_fake_quant":
            module, role = ".".join(parts[:-1]), "weight"
        elif parts[-1] == "activation_post_process" and len(parts) > 1:
            module, role = ".".join(parts[:-1]), "output"
        else:  # FX-prepared observer node at the root: named by itself
            module, role = prefix, "output"
        obs = f"{dot}activation_post_process."
        own = [f"{dot}{leaf}" for leaf in ("scale", "zero_point", "fake_quant_enabled", "observer_enabled")]
        observer = [k for k in state if k.startswith(obs) and "." not in k[len(obs) :]]
        keys = [k for k in own if k in state] + observer
        scale = np.asarray(state[scale_key])
        zero_point = np.asarray(state[zp_key])
        cfg, inferred = _fq_config(model, prefix, role, scale, zero_point)
        _add(
            table,
            QParamRecord(
                module=module,
                role=role,
                scale=scale,
                zero_point=zero_point,
                source="eager_qat",
                min_val=_opt(state, f"{obs}min_val"),
                max_val=_opt(state, f"{obs}max_val"),
                torch_keys=tuple(sorted(keys)),
                inferred=inferred,
                **cfg,
            ),
        )
        used.update(keys)


def _opt(state, key):
    return np.asarray(state[key]) if key in state else None


def _submodule(model: Any, path: str) -> Any:
    if model is None or not hasattr(model, "get_submodule"):
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _read_fx_reference(state, model, table, used) -> None:
    for key in [k for k in state if k.endswith(".weight_scale") and k not in used]:
        module = key[: -len(".weight_scale")]
        dtype_key = f"{module}.weight_dtype"
        if str(state.get(dtype_key, "")).removeprefix("torch.") in ("float16", "bfloat16", "float32"):
            # fp16 reference module (dynamic/static fp16 qconfig): the weight is cast, it has no qparams
            used.update(k for k in state if k.startswith(f"{module}.weight_") and k != f"{module}.weight")
            continue
        need = [f"{module}.weight_zero_point", f"{module}.weight_qscheme", dtype_key]
        missing = [k for k in need if k not in state]
        if missing:
            raise InteropError(f"{key}: FX reference weight qparams without {missing}")
        qscheme = str(state[f"{module}.weight_qscheme"])
        dtype = canonical_dtype(str(state[dtype_key]))
        axis_key = f"{module}.weight_axis"
        axis = int(np.asarray(state[axis_key])) if is_per_channel(qscheme) and axis_key in state else None
        ref = _submodule(model, module)
        inferred: tuple[str, ...] = ()
        if ref is not None and getattr(ref, "weight_quant_min", None) is not None:
            lo, hi = int(ref.weight_quant_min), int(ref.weight_quant_max)
        else:
            lo, hi = INT_RANGES[dtype]
            if model is None:  # a custom range (e.g. -8..7) is on the module, not in the state_dict
                inferred = ("quant_min", "quant_max")
        keys = [*need, key] + ([axis_key] if axis_key in state else [])
        _add(
            table,
            QParamRecord(
                module=module,
                role="weight",
                scale=np.asarray(state[key]),
                zero_point=np.asarray(state[f"{module}.weight_zero_point"]),
                axis=axis,
                dtype=dtype,
                qscheme=qscheme,
                quant_min=lo,
                quant_max=hi,
                source="fx_reference",
                torch_keys=tuple(keys),
                inferred=inferred,
            ),
        )
        used.update(keys)
    # FX's converted graphs name activation qparams after the node: <node>_scale_<n>, <node>_input_scale_<n>;
    # those of call_function nodes (add, cat) have an empty node part: _scale_<n> (module "_scale_<n>")
    pattern = re.compile(r"^(?P<node>[^.]*?)_(?P<input>input_)?scale_(?P<n>\d+)$")
    for key in [k for k in state if k not in used]:
        match = pattern.match(key)
        if not match:
            continue
        zp_key = key.replace("scale_", "zero_point_")
        if zp_key not in state:
            continue
        role = "input" if match.group("input") else "output"
        module = match.group("node")
        if not module:
            module = key
        elif match.group("n") != "0":
            module = f"{module}#{match.group('n')}"
        _add(table, _activation_record(module, role, state, key, zp_key, "fx_reference"))
        used.update((key, zp_key))


def _is_dynamic(model: Any, module: str, state) -> bool:
    """A dynamically quantized module (its ``scale``/``zero_point`` are placeholders: the output is float)."""
    if str(state.get(f"{module}._packed_params.dtype", "")).removeprefix("torch.") in ("float16", "bfloat16"):
        return True
    sub = _submodule(model, module)
    return sub is not None and ".dynamic." in type(sub).__module__


def _read_converted(state, model, table, used) -> None:
    for key, value in state.items():
        if key in used or not isinstance(value, QuantizedTensor):
            continue
        module, _, leaf = key.rpartition(".")
        if key.endswith("_packed_params._packed_weight"):  # quantized Embedding / EmbeddingBag
            module, leaf = f".{key}"[: -len("._packed_params._packed_weight")].lstrip("."), "weight"
        if leaf != "weight":
            raise InteropError(f"{key}: quantized tensor that is not a module weight; cannot place its qparams")
        lo, hi = INT_RANGES[value.dtype]
        _add(
            table,
            QParamRecord(
                module=module,
                role="weight",
                scale=value.scale,
                zero_point=value.zero_point,
                axis=value.axis,
                dtype=value.dtype,
                qscheme=value.qscheme,
                quant_min=lo,
                quant_max=hi,
                source="eager_converted",
                qdata=value.data,
                torch_keys=(key,),
            ),
        )
        used.add(key)
    for key in [k for k in state if k.endswith("zero_point") and k not in used]:
        prefix = key[: -len("zero_point")]
        scale_key = f"{prefix}scale"
        zp = state[key]
        if scale_key not in state or scale_key in used or not np.issubdtype(np.asarray(zp).dtype, np.integer):
            continue
        if _is_dynamic(model, prefix.rstrip("."), state):
            used.update((scale_key, key))
            continue
        _add(table, _activation_record(prefix.rstrip("."), "output", state, scale_key, key, "eager_converted"))
        used.update((scale_key, key))


def _activation_record(module: str, role: str, state, scale_key: str, zp_key: str, source: str) -> QParamRecord:
    """A per-tensor activation record from a scale / zero-point buffer pair. Those files do not store the dtype:
    torch's activations are quint8 over 0..255, so that is assumed (and listed in ``inferred``)."""
    return QParamRecord(
        module=module,
        role=role,
        scale=np.asarray(state[scale_key]),
        zero_point=np.asarray(state[zp_key]),
        axis=None,
        dtype="uint8",
        qscheme="per_tensor_affine",
        quant_min=0,
        quant_max=255,
        source=source,
        torch_keys=(scale_key, zp_key),
        inferred=("dtype",),
    )


def _torchao_dtype(meta: dict) -> str:
    data = meta.get("_data", {})
    for name in ("target_dtype", "dtype_q"):
        value = data.get(name)
        if isinstance(value, dict) and value.get("_type") == "torch.dtype":
            return canonical_dtype(value["_data"])
    return "int8"


def _read_torchao(state, metadata, table, used) -> None:
    if "tensor_names" not in metadata:
        return
    try:
        names = json.loads(metadata["tensor_names"])
    except json.JSONDecodeError as err:
        raise InteropError(f"metadata['tensor_names']: not JSON ({err})") from err
    for name in names:
        meta = json.loads(metadata.get(name, "{}"))
        kind = meta.get("_type")
        if kind in (None, "Tensor", "torch.Tensor"):
            continue
        module, _, leaf = name.rpartition(".")
        prefix = f"{module}._{leaf}_" if module else f"_{leaf}_"
        qdata_key, scale_key, zp_key = f"{prefix}qdata", f"{prefix}scale", f"{prefix}zero_point"
        if qdata_key not in state or scale_key not in state:
            raise InteropError(f"torchao tensor {name!r} ({kind}): missing {qdata_key!r} or {scale_key!r}")
        if kind not in ("Int8Tensor", "IntxUnpackedToInt8Tensor"):
            raise InteropError(
                f"torchao tensor {name!r}: type {kind} is not supported (Int8Tensor, IntxUnpackedToInt8Tensor)"
            )
        qdata = np.asarray(state[qdata_key])
        scale = np.asarray(state[scale_key])
        zero_point = np.asarray(state[zp_key]) if zp_key in state else np.zeros(scale.shape, np.int8)
        block = tuple(int(b) for b in meta.get("_data", {}).get("block_size", qdata.shape))
        dtype = _torchao_dtype(meta) if kind != "Int8Tensor" else "int8"
        lo, hi = INT_RANGES[dtype]
        symmetric = zp_key not in state
        if block == qdata.shape:
            axis, scale_v, zp_v, qscheme, block_size = (
                None,
                scale.reshape(()),
                zero_point.reshape(()),
                "per_tensor",
                None,
            )
        elif qdata.ndim == 2 and block == (1, qdata.shape[1]):
            axis, scale_v, zp_v, qscheme, block_size = 0, scale.reshape(-1), zero_point.reshape(-1), "per_channel", None
        else:
            axis, scale_v, zp_v, qscheme, block_size = 0, scale, zero_point, "per_channel", block
        keys = tuple(k for k in (qdata_key, scale_key, zp_key) if k in state)
        _add(
            table,
            QParamRecord(
                module=module,
                role="weight",
                scale=scale_v,
                zero_point=zp_v,
                axis=axis,
                dtype=dtype,
                qscheme=f"{qscheme}_{'symmetric' if symmetric else 'affine'}",
                quant_min=lo,
                quant_max=hi,
                source=f"torchao:{kind}",
                block_size=block_size,
                qdata=qdata,
                torch_keys=keys,
            ),
        )
        used.update(keys)


# torch's CPU int4 pack (``_convert_weight_to_int4pack_for_cpu``, what gpt-fast writes with use_cuda=False) depends
# on the instruction set torch was built for: (row block, lanes) of its AVX2 and AVX512 kernels, then the plain one
_CPU_INT4_LAYOUTS = (("avx2", 32, 16), ("avx512", 64, 16), ("generic", 64, 0))


def _unpack_cpu_int4(packed: np.ndarray, n: int, k: int, block: int, lanes: int) -> np.ndarray:
    """(n, k) values 0..15 from torch's CPU int4 pack: row blocks of ``block``; a full block interleaves row
    groups of ``lanes`` (byte ``k * block / 2 + d`` holds rows ``d`` and ``d + block / 2``, AVX512 two such
    halves); a partial block (or ``lanes == 0``) packs row pairs, the even row in the low nibble."""
    flat = np.asarray(packed).reshape(-1)
    out = np.zeros((n, k), np.int32)
    start = 0
    for b0 in range(0, n, block):
        nb = min(block, n - b0)
        seg = flat[start : start + nb * k // 2].astype(np.int32)
        start += nb * k // 2
        if nb == block and lanes:
            half = block // lanes // 2
            seg = seg.reshape(k, half, lanes)
            for g in range(half):
                out[b0 + g * lanes : b0 + (g + 1) * lanes] = (seg[:, g, :] & 15).T
                out[b0 + (g + half) * lanes : b0 + (g + half + 1) * lanes] = (seg[:, g, :] >> 4).T
        else:
            seg = seg.reshape(k, nb // 2)
            out[b0 : b0 + nb : 2] = (seg & 15).T
            out[b0 + 1 : b0 + nb : 2] = (seg >> 4).T
    return out


def _pack_cpu_int4(values: np.ndarray, inner_k_tiles: int = 2) -> np.ndarray:
    """torch's own CPU int4 pack of (n, k) values 0..15 (gpt-fast's ``WeightOnlyInt4Linear`` on CPU)."""
    from interop._torch import require_torch

    torch = require_torch("writing gpt-fast int4 weights")
    w = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int32))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, inner_k_tiles).numpy()


def _gpt_fast_int4_values(key: str, packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """Unpack with the layout whose re-pack by this torch gives the same bytes (the layout is ISA-specific)."""
    if packed.ndim != 2 or packed.dtype != np.uint8 or packed.shape != (n, k // 2):
        raise InteropError(
            f"{key}: gpt-fast int4 weight {packed.dtype} {packed.shape} is not the CPU layout uint8 ({n}, {k // 2}) "
            "(the CUDA tinygemm layout is not supported: re-export the checkpoint on CPU, use_cuda=False)"
        )
    for _name, block, lanes in _CPU_INT4_LAYOUTS:
        values = _unpack_cpu_int4(packed, n, k, block, lanes)
        if np.array_equal(_pack_cpu_int4(values), packed):
            return values
    raise InteropError(
        f"{key}: gpt-fast int4 weight in a CPU layout this torch build does not write (torch's CPU int4 pack depends "
        "on the instruction set: AVX2 / AVX512); read it on a machine like the one that wrote it"
    )


def _read_gpt_fast_int4(state, table, used) -> None:
    for key in [k for k in state if k.endswith(".scales_and_zeros") and k not in used]:
        module = key[: -len(".scales_and_zeros")]
        wkey = f"{module}.weight"
        sz = np.asarray(state[key])
        if wkey not in state or sz.ndim != 3 or sz.shape[2] != 2:
            raise InteropError(f"{key}: gpt-fast scales_and_zeros {sz.shape} needs (K / group, N, 2) and {wkey!r}")
        groups, n, _ = sz.shape
        packed = np.asarray(state[wkey])
        k = packed.shape[-1] * 2 if packed.ndim == 2 else -1
        if k <= 0 or k % groups:
            raise InteropError(f"{wkey}: gpt-fast int4 weight {packed.shape} does not match {key} {sz.shape}")
        values = _gpt_fast_int4_values(wkey, packed, n, k)
        scale = np.ascontiguousarray(sz[:, :, 0].T)
        zero = np.ascontiguousarray(sz[:, :, 1].T)
        # gpt-fast: w = (q - 8) * scale + zero, q in 0..15  ==  (q_signed - zp) * scale with zp = -zero / scale
        zp = -zero.astype(np.float64) / scale.astype(np.float64)
        integral = np.all(np.abs(zp - np.round(zp)) < 1e-3)
        _add(
            table,
            QParamRecord(
                module=module,
                role="weight",
                scale=scale,
                zero_point=np.round(zp).astype(np.int32) if integral else zp.astype(np.float32),
                axis=0,
                dtype="int4",
                qscheme="per_channel_affine" if integral else "per_channel_affine_float_qparams",
                quant_min=-8,
                quant_max=7,
                source="gpt_fast",
                block_size=(1, k // groups),
                qdata=(values - 8).astype(np.int8),
                torch_keys=(wkey, key),
            ),
        )
        used.update((wkey, key))


def _read_gpt_fast(state, table, used) -> None:
    _read_gpt_fast_int4(state, table, used)
    for key in [k for k in state if k.endswith(".scales") and k not in used]:
        module = key[: -len(".scales")]
        weight = state.get(f"{module}.weight")
        if not isinstance(weight, np.ndarray) or weight.dtype != np.int8:
            continue
        scales = np.asarray(state[key])
        if weight.ndim != 2 or scales.shape != (weight.shape[0],):
            raise InteropError(f"{key}: gpt-fast scales {scales.shape} do not match weight {weight.shape} (out, in)")
        _add(
            table,
            QParamRecord(
                module=module,
                role="weight",
                scale=scales,
                zero_point=np.zeros(scales.shape, np.int64),
                axis=0,
                dtype="int8",
                qscheme="per_channel_symmetric",
                quant_min=-128,
                quant_max=127,
                source="gpt_fast",
                qdata=weight,
                torch_keys=(f"{module}.weight", key),
            ),
        )
        used.update((key, f"{module}.weight"))


def write_torch_qparams(table: QParamTable, template: Any, *, strict: bool = True) -> dict[str, Any]:
    """A torch state_dict: ``template`` (a torch module or its state_dict: eager ``prepare_qat`` or FX
    reference) with every record's scale / zero point (and observer min/max when the record has
    them) written into the matching buffers, cast to the template's dtypes.

    Raises InteropError for a record with no matching buffers (unless ``strict=False``) or a shape
    mismatch. The result loads with ``load_state_dict(strict=True)``.
    """
    from interop._torch import require_torch

    torch = require_torch("export_qparams")
    state = template.state_dict() if hasattr(template, "state_dict") else template
    out = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    unplaced = []
    for module, roles in table.items():
        for role, rec in roles.items():
            targets = _targets(module, role, out)
            if targets is None:
                unplaced.append(f"{module} ({role})")
                continue
            for key, value in zip(targets, (rec.scale, rec.zero_point, rec.min_val, rec.max_val), strict=False):
                if key is None or value is None or key not in out:
                    continue
                dst = out[key]
                src = torch.from_numpy(np.array(value, copy=True)).to(dst.dtype)
                if src.numel() == dst.numel():
                    out[key] = src.reshape(dst.shape)
                elif "fake_quant" in key or ".activation_post_process." in f".{key}":
                    # torch's fake quants and observers resize these buffers on load (a fresh
                    # per-channel fake quant holds a one-value placeholder)
                    out[key] = src
                else:
                    raise InteropError(
                        f"{key}: record {module} ({role}) has {src.numel()} values, buffer {tuple(dst.shape)}"
                    )
    if unplaced and strict:
        raise InteropError(f"export_qparams: no matching torch buffers for {unplaced}")
    return out


def write_gpt_fast(table: QParamTable, template: Any = None, *, inner_k_tiles: int = 2) -> dict[str, Any]:
    """A gpt-fast state_dict: every weight record as gpt-fast's weight-only layout.

    * int8 per-channel symmetric (axis 0): ``<m>.weight`` int8 (out, in) and ``<m>.scales`` (out,);
    * int4 / uint4 per group along the input dim (``block_size (1, g)``): ``<m>.weight`` in torch's CPU int4 pack
      (``_convert_weight_to_int4pack_for_cpu``, gpt-fast with use_cuda=False) and ``<m>.scales_and_zeros``
      (in / g, out, 2) with gpt-fast's float zero: ``w = (q - 8) * scale + zero`` (``zero = -zp * scale`` for int4).

    The integer weights are the records' ``qdata``; records without (a jquant qstate) quantize the float
    ``<m>.weight`` of ``template`` (a torch state_dict or module) with their qparams, dividing as gpt-fast does.
    Every other template entry is copied. Reading the result back (``read_torch_qparams``) gives the records.
    """
    from interop._torch import require_torch

    torch = require_torch("export_qparams(layout='gpt_fast')")
    state = template.state_dict() if hasattr(template, "state_dict") else dict(template or {})
    out = {k: v for k, v in state.items()}
    for module, roles in table.items():
        rec = roles.get("weight")
        if rec is None:
            continue
        wkey = f"{module}.weight"
        int8 = rec.dtype == "int8" and rec.block_size is None and rec.axis == 0 and not np.any(rec.zero_point)
        int4 = rec.dtype in ("int4", "uint4") and rec.block_size is not None and rec.block_size[0] == 1
        if not (int8 or int4):
            raise InteropError(
                f"export_qparams(layout='gpt_fast'): {module} (weight) is {rec.dtype} {rec.qscheme} block "
                f"{rec.block_size}; gpt-fast has int8 per-channel symmetric and int4 per-group (block (1, g)) layouts"
            )
        q = rec.qdata
        if q is None:
            if wkey not in state:
                raise InteropError(
                    f"export_qparams(layout='gpt_fast'): record {module} (weight) has no integer data "
                    f"and the template has no float {wkey!r} to quantize"
                )
            q = _quantize_like_gpt_fast(np.asarray(state[wkey].detach().float().numpy()), rec)
        q = np.asarray(q)
        if int8:
            out[wkey] = torch.from_numpy(q.astype(np.int8))
            out[f"{module}.scales"] = torch.from_numpy(np.array(rec.scale, copy=True).reshape(-1))
        else:
            n, k = q.shape
            group = rec.block_size[1]
            scale = np.asarray(rec.scale, np.float32).reshape(n, k // group)
            zp = np.asarray(rec.zero_point).reshape(n, k // group)
            offset = 8 if rec.dtype == "int4" else 0  # gpt-fast stores q + 8 in 0..15
            zero = ((offset - 8) - zp.astype(np.float32)) * scale
            out[wkey] = torch.from_numpy(_pack_cpu_int4(q.astype(np.int32) + offset, inner_k_tiles))
            out[f"{module}.scales_and_zeros"] = torch.from_numpy(np.stack([scale.T, zero.T], axis=-1).copy())
    return out


def _quantize_like_gpt_fast(w: np.ndarray, rec: QParamRecord) -> np.ndarray:
    """Integer weights from float ``w`` (out, in) and the record's qparams: ``round(w / scale) + zp``, clamped."""
    n, k = w.shape
    if rec.block_size is not None:
        group = rec.block_size[1]
        scale = np.repeat(np.asarray(rec.scale, np.float32).reshape(n, k // group), group, axis=1)
        zp = np.repeat(np.asarray(rec.zero_point, np.float32).reshape(n, k // group), group, axis=1)
    else:
        scale = np.asarray(rec.scale, np.float32).reshape(n, 1)
        zp = np.asarray(rec.zero_point, np.float32).reshape(n, 1)
    q = np.round(w.astype(np.float32) / scale) + zp
    return np.clip(q, rec.quant_min, rec.quant_max).astype(np.int8 if rec.quant_min < 0 else np.uint8)


def _targets(module: str, role: str, state: Mapping[str, Any]) -> tuple[str | None, ...] | None:
    dot = f"{module}." if module else ""
    if role == "weight":
        candidates = [f"{dot}weight_fake_quant.", None]
        fx = (f"{dot}weight_scale", f"{dot}weight_zero_point")
    else:
        candidates = [f"{dot}activation_post_process." if role == "output" else None, f"{module}."]
        node, _, n = module.partition("#")
        n = n or "0"
        fx = (
            (module, module.replace("scale_", "zero_point_"))
            if re.match(r"^_(input_)?scale_\d+$", module)
            else (
                (f"{node}_input_scale_{n}", f"{node}_input_zero_point_{n}")
                if role == "input"
                else (f"{node}_scale_{n}", f"{node}_zero_point_{n}")
            )
        )
    for prefix in candidates:
        if prefix and f"{prefix}scale" in state and f"{prefix}fake_quant_enabled" in state:
            obs = f"{prefix}activation_post_process."
            return (f"{prefix}scale", f"{prefix}zero_point", f"{obs}min_val", f"{obs}max_val")
    if fx[0] in state and fx[1] in state:
        return fx
    return None
