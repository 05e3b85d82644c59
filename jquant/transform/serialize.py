"""Save / load converted params (safetensors) and export integer functions with ``jax.export``.

The safetensors file is self-describing: tensors are stored under their pytree path and the tree skeleton
(dicts, lists, tuples, jquant's named tuples, None, ``QuantizedWeight`` layout fields) is kept as JSON in the
file's metadata, so
``load_int_params(path)`` needs no template. Exported functions take the params as a flat list of leaves, so
jax's serialization needs no custom pytree registration.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jquant.kernels import native
from jquant.kernels.weights import QuantizedWeight

_FORMAT = "jquant.int_params.v1"
# QuantizedWeight's array fields are its pytree children (not marked static); the static ones are layout facts.
_QW_FIELDS = {f.name: f for f in dataclasses.fields(QuantizedWeight)}
_QW_ARRAYS = tuple(name for name, f in _QW_FIELDS.items() if not f.metadata.get("static"))
_MAX_DEPTH = 256


def _encode(node: Any, path: str, tensors: dict[str, np.ndarray]) -> Any:
    if node is None:
        return None
    if isinstance(node, QuantizedWeight):
        spec = {"__quantized_weight__": {}}
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if f.name in _QW_ARRAYS:
                spec["__quantized_weight__"][f.name] = _encode(value, f"{path}.{f.name}", tensors)
            else:
                spec["__quantized_weight__"][f.name] = list(value) if isinstance(value, tuple) else value
        return spec
    if isinstance(node, Mapping):
        for key in node:
            if not isinstance(key, str):
                raise TypeError(f"params: dict key {key!r} at {path or '<root>'} is not a string; cannot save it")
        return {"__dict__": {k: _encode(v, f"{path}/{k}", tensors) for k, v in node.items()}}
    if isinstance(node, tuple) and hasattr(type(node), "_fields"):
        cls = type(node)
        if not cls.__module__.startswith("jquant."):
            raise TypeError(f"params: cannot save a {cls.__name__} at {path or '<root>'}; only jquant's named "
                            "tuples (qparams, converted sites, observer states) are stored by type")
        fields = {k: _encode(v, f"{path}/{k}", tensors) for k, v in zip(cls._fields, node, strict=True)}
        return {"__namedtuple__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(node, list | tuple):
        kind = "__list__" if isinstance(node, list) else "__tuple__"
        return {kind: [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(node)]}
    if isinstance(node, jax.Array | np.ndarray | np.generic | int | float | bool):
        key = path or "/"
        value = np.asarray(node)
        tensors[key] = np.ascontiguousarray(value.reshape(-1) if value.ndim == 0 else value)
        return {"__tensor__": key, "shape": list(value.shape)}
    raise TypeError(f"params: cannot save a {type(node).__name__} at {path or '<root>'}; "
                    "expected dicts, lists, tuples, arrays and QuantizedWeight")


class _BadFile(ValueError):
    """An inconsistent params file; the message names the entry, load_int_params adds the file."""


def _decode(spec: Any, tensors: Mapping[str, np.ndarray], where: str = "<root>", depth: int = 0) -> Any:
    if spec is None:
        return None
    if depth > _MAX_DEPTH:
        raise _BadFile(f"entry {where}: the tree is nested more than {_MAX_DEPTH} levels deep")
    if not isinstance(spec, dict) or len(spec) == 0:
        raise _BadFile(f"entry {where}: expected a node object in the tree skeleton, got {type(spec).__name__}")
    if "__tensor__" in spec:
        return jax.numpy.asarray(_tensor(spec, tensors, where))
    if "__dict__" in spec:
        items = spec["__dict__"]
        if not isinstance(items, dict):
            raise _BadFile(f"entry {where}: '__dict__' must hold an object, got {type(items).__name__}")
        return {k: _decode(v, tensors, f"{where}/{k}", depth + 1) for k, v in items.items()}
    for kind, build in (("__list__", list), ("__tuple__", tuple)):
        if kind in spec:
            items = spec[kind]
            if not isinstance(items, list):
                raise _BadFile(f"entry {where}: '{kind}' must hold an array, got {type(items).__name__}")
            return build(_decode(v, tensors, f"{where}/{i}", depth + 1) for i, v in enumerate(items))
    if "__quantized_weight__" in spec:
        return _decode_quantized_weight(spec["__quantized_weight__"], tensors, where, depth)
    if "__namedtuple__" in spec:
        cls = _named_tuple_class(spec["__namedtuple__"], where)
        fields = spec.get("fields")
        if not isinstance(fields, dict) or tuple(fields) != tuple(cls._fields):
            raise _BadFile(f"entry {where}: {cls.__name__} needs the fields {list(cls._fields)}")
        return cls(*(_decode(v, tensors, f"{where}/{k}", depth + 1) for k, v in fields.items()))
    raise _BadFile(f"entry {where}: unknown node {sorted(map(str, spec))} in the stored tree skeleton")


def _named_tuple_class(name: Any, where: str) -> type:
    """The jquant named-tuple class ``module:qualname``; nothing outside jquant is imported."""
    if not isinstance(name, str) or ":" not in name or not name.startswith("jquant."):
        raise _BadFile(f"entry {where}: {name!r} is not a jquant named tuple type")
    module_name, qualname = name.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise _BadFile(f"entry {where}: unknown jquant type {name!r} (saved by another jquant version?)") from None
    if not (isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")):
        raise _BadFile(f"entry {where}: {name!r} is not a named tuple type")
    return obj


def _tensor(spec: dict, tensors: Mapping[str, np.ndarray], where: str) -> np.ndarray:
    key, shape = spec.get("__tensor__"), spec.get("shape")
    if not isinstance(key, str) or key not in tensors:
        raise _BadFile(f"entry {where}: refers to tensor {key!r}, which the file does not hold")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in shape):
        raise _BadFile(f"entry {where}: 'shape' must be a list of non-negative integers, got {shape!r}")
    value = tensors[key]
    if value.size != int(np.prod(shape, dtype=np.int64)):
        raise _BadFile(f"entry {where}: tensor {key!r} holds {value.size} values, the skeleton declares shape "
                       f"{tuple(shape)}")
    return value.reshape(shape)


def _check_static(name: str, value: Any, where: str) -> Any:
    """Type-check a static QuantizedWeight field by its annotation (int / bool / str / tuple[int, ...], or None)."""
    annotation = str(_QW_FIELDS[name].type)
    if value is None:
        if "None" in annotation:
            return None
        raise _BadFile(f"entry {where}: field {name!r} must not be null ({annotation})")
    if "tuple" in annotation:
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(value)
    elif annotation.startswith("bool"):
        if isinstance(value, bool):
            return value
    elif annotation.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation.startswith("str"):
        if isinstance(value, str):
            return value
    else:
        return value
    raise _BadFile(f"entry {where}: field {name!r} must be {annotation}, got {value!r}")


def _decode_quantized_weight(spec: Any, tensors: Mapping[str, np.ndarray], where: str, depth: int):
    if not isinstance(spec, dict):
        raise _BadFile(f"entry {where}: '__quantized_weight__' must hold an object, got {type(spec).__name__}")
    spec = dict(spec)
    derived = {}  # stored by files of jquant <= 0.1; now derived from block_size, still checked for range
    for name in ("axis", "group_size", "group_axis"):
        stored = spec.pop(name, None)
        if stored is not None and (not isinstance(stored, int) or isinstance(stored, bool)):
            raise _BadFile(f"entry {where}.{name}: must be an integer or null, got {stored!r}")
        derived[name] = stored
    unknown = sorted(set(spec) - set(_QW_FIELDS))
    if unknown:
        raise _BadFile(f"entry {where}: QuantizedWeight has no field(s) {unknown} (written by a newer jquant?)")
    required = [n for n, f in _QW_FIELDS.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in spec]
    if missing:
        raise _BadFile(f"entry {where}: QuantizedWeight field(s) {missing} are missing")
    fields = {}
    for name, value in spec.items():
        if name in _QW_ARRAYS:
            if value is not None and not (isinstance(value, dict) and "__tensor__" in value):
                raise _BadFile(f"entry {where}.{name}: expected a tensor or null")
            fields[name] = _decode(value, tensors, f"{where}.{name}", depth + 1)
        else:
            fields[name] = _check_static(name, value, f"{where}.{name}")
    _check_quantized_weight({**fields, **derived}, where)
    try:
        return QuantizedWeight(**fields)
    except (TypeError, ValueError) as err:
        raise _BadFile(f"entry {where}: not a valid QuantizedWeight ({err})") from err


def _check_quantized_weight(fields: dict[str, Any], where: str) -> None:
    """The layout facts must agree with each other and with the stored arrays."""
    from jquant.kernels.weights import WEIGHT_DTYPES

    def bad(msg: str) -> _BadFile:
        return _BadFile(f"entry {where}: inconsistent QuantizedWeight: {msg}")

    dtype = fields.get("dtype", _QW_FIELDS["dtype"].default)
    if dtype not in WEIGHT_DTYPES:
        raise bad(f"dtype {dtype!r} is not one of {WEIGHT_DTYPES}")
    shape = tuple(fields.get("shape", ()))
    ndim = len(shape)
    if ndim == 0:
        raise bad("'shape' is empty")
    block = tuple(fields.get("block_size", ()))
    if len(block) != ndim or any(b < 1 or n % b for n, b in zip(shape, block, strict=False)):
        raise bad(f"block_size {block} does not divide shape {shape} dim by dim")
    for name in ("axis", "group_axis", "packed_axis"):
        axis = fields.get(name)
        if axis is not None and not -ndim <= axis < ndim:
            raise bad(f"{name} {axis} is out of range for shape {shape}")
    for axis in fields.get("sum_axes") or ():
        if not -ndim <= axis < ndim:
            raise bad(f"sum_axes entry {axis} is out of range for shape {shape}")
    if fields.get("qvalue") is None:
        if fields.get("kernel_data") is None or not fields.get("sum_axes"):
            raise bad("qvalue is missing and there is no packed kernel copy (kernel_data, sum_axes) to unpack")
        _check_scale(fields, shape, block, bad)
        return
    qvalue = np.asarray(fields["qvalue"])
    want = list(shape)
    if fields.get("packed"):
        packed_axis = fields.get("packed_axis")
        if packed_axis is None or want[packed_axis] % 2:
            raise bad(f"packed int4 values need an even packed_axis dim, got packed_axis {packed_axis}")
        want[packed_axis] //= 2
        want_dtype = np.uint8
    else:
        want_dtype = np.int8
    if qvalue.shape != tuple(want) or qvalue.dtype != want_dtype:
        raise bad(f"qvalue is {qvalue.dtype}{qvalue.shape}, the declared shape {shape} needs "
                  f"{np.dtype(want_dtype)}{tuple(want)}")
    _check_scale(fields, shape, block, bad)


def _check_scale(fields: dict[str, Any], shape: tuple, block: tuple, bad: Callable[[str], Exception]) -> None:
    counts = tuple(n // b for n, b in zip(shape, block, strict=True))
    scale = np.asarray(fields["scale"])
    if scale.size != int(np.prod(counts)) or not np.issubdtype(scale.dtype, np.floating):
        raise bad(f"scale is {scale.dtype}{scale.shape}, the block layout needs {int(np.prod(counts))} float values")
    if not np.all(np.isfinite(scale) & (scale > 0)):
        raise bad("scale holds values that are not finite and > 0")
    zero_point = fields.get("zero_point")
    if zero_point is not None:
        zp = np.asarray(zero_point)
        if zp.size != scale.size or not np.issubdtype(zp.dtype, np.integer):
            raise bad(f"zero_point is {zp.dtype}{zp.shape}, it needs {scale.size} integer values like scale")


def save_int_params(path: str | Path, params: Any) -> None:
    """Write ``params`` (a tree of dicts / lists / tuples / arrays / ``QuantizedWeight``) to a safetensors file."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    skeleton = _encode(params, "", tensors)
    save_file(tensors, str(path), metadata={"format": _FORMAT, "tree": json.dumps(skeleton)})


def load_int_params(path: str | Path) -> Any:
    """Read a file written by ``save_int_params`` back into the same tree (int arrays stay int).

    The file is validated as it is read: a missing or malformed skeleton, a reference to an absent tensor, and
    a ``QuantizedWeight`` whose arrays disagree with its declared layout (shape, block size, axes, packing)
    raise ValueError naming the file and the entry.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(
                    f"path: {path} is not a jquant int params file (format {metadata.get('format')!r})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except FileNotFoundError:
        raise
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error type for truncated or corrupted files
        raise ValueError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from err
    text = metadata.get("tree")
    if not isinstance(text, str):
        raise ValueError(f"{path}: the metadata has no 'tree' skeleton; the file is not a complete int params file")
    try:
        skeleton = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: the stored tree skeleton is not valid JSON ({type(err).__name__})") from err
    try:
        return _decode(skeleton, tensors)
    except _BadFile as err:
        raise ValueError(f"{path}: {err}") from None


def export_int_fn(int_fn: Callable, int_params: Any, *args: Any, native_kernels: bool = False) -> bytes:
    """Serialize ``jit(int_fn)(int_params, *args)`` with ``jax.export``: StableHLO with the int8 ops.

    The bytes are jax's own serialization (``Exported.serialize``), for ``load_exported``; shapes and dtypes of
    ``int_params`` and ``args`` (arrays) are fixed, and the reloaded function returns the output leaves (one
    array, or a list for several outputs).
    By default the portable XLA form of the kernels is exported. ``native_kernels=True`` keeps jquant's native CPU
    kernels (custom calls ``jquant_*``): the artifact then runs only on CPU, in a process that has registered
    them (``load_exported`` does).
    """
    leaves, treedef = jax.tree.flatten(int_params)

    def flat_fn(param_leaves, *inputs):
        out = jax.tree.leaves(int_fn(jax.tree.unflatten(treedef, param_leaves), *inputs))
        return out[0] if len(out) == 1 else out

    if native_kernels:
        exported = jax.export.export(jax.jit(flat_fn), disabled_checks=native.export_safety_checks())(leaves, *args)
    else:
        with native.xla_kernels():
            try:
                exported = jax.export.export(jax.jit(flat_fn))(leaves, *args)
            except ValueError as err:  # a jit inside int_fn reused a trace made with the native kernels
                if "jquant_" not in str(err):
                    raise
                jax.clear_caches()
                exported = jax.export.export(jax.jit(flat_fn))(leaves, *args)
    if exported.ordered_effects or exported.unordered_effects or exported.nr_devices != 1:
        raise ValueError("int_fn: only single-device functions without side effects can be exported")
    return bytes(exported.serialize())


def load_exported(blob: bytes) -> Callable:
    """Inverse of ``export_int_fn``: a callable ``f(int_params, *args)`` running the stored StableHLO.

    ``f.exported`` is the ``jax.export.Exported`` (e.g. for ``.mlir_module()``).
    """
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except Exception as err:  # flatbuffers raises assorted errors on foreign or truncated bytes
        raise ValueError(f"blob: not a serialized jax.export function ({type(err).__name__}: {err})") from err
    num_leaves = len(exported.in_tree.children()[0].children()[0].children())
    if "jquant_" in exported.mlir_module() and not native.register():
        raise RuntimeError(
            "blob: this function was exported with jquant's native CPU kernels (custom calls jquant_*), which cannot "
            f"be registered in this process ({native.backend()}); export it with native_kernels=False for the "
            "portable XLA form")

    def call(int_params, *args):
        leaves = jax.tree.leaves(int_params)
        if len(leaves) != num_leaves:
            raise ValueError(f"int_params: expected {num_leaves} array leaves, got {len(leaves)}")
        return exported.call(leaves, *args)

    call.exported = exported
    return call
