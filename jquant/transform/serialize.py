"""Save / load converted params (safetensors) and export integer functions with ``jax.export``.

The safetensors file is self-describing: tensors are stored under their pytree path and the tree skeleton
(dicts, lists, tuples, None, ``QuantizedWeight`` layout fields) is kept as JSON in the file's metadata, so
``load_int_params(path)`` needs no template. Exported functions take the params as a flat list of leaves, so
jax's serialization needs no custom pytree registration.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jquant.kernels import native
from jquant.kernels.weights import QuantizedWeight

_FORMAT = "jquant.int_params.v1"
_QW_ARRAYS = ("qvalue", "scale", "zero_point", "w_sums", "kernel_data")


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


def _decode(spec: Any, tensors: Mapping[str, np.ndarray]) -> Any:
    if spec is None:
        return None
    if "__tensor__" in spec:
        return jax.numpy.asarray(tensors[spec["__tensor__"]].reshape(spec["shape"]))
    if "__dict__" in spec:
        return {k: _decode(v, tensors) for k, v in spec["__dict__"].items()}
    if "__list__" in spec:
        return [_decode(v, tensors) for v in spec["__list__"]]
    if "__tuple__" in spec:
        return tuple(_decode(v, tensors) for v in spec["__tuple__"])
    if "__quantized_weight__" in spec:
        fields = {}
        for name, value in spec["__quantized_weight__"].items():
            if name in _QW_ARRAYS:
                fields[name] = _decode(value, tensors)
            else:
                fields[name] = tuple(value) if isinstance(value, list) else value
        return QuantizedWeight(**fields)
    raise ValueError(f"params file: unknown node {sorted(spec)} in the stored tree skeleton")


def save_int_params(path: str | Path, params: Any) -> None:
    """Write ``params`` (a tree of dicts / lists / tuples / arrays / ``QuantizedWeight``) to a safetensors file."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    skeleton = _encode(params, "", tensors)
    save_file(tensors, str(path), metadata={"format": _FORMAT, "tree": json.dumps(skeleton)})


def load_int_params(path: str | Path) -> Any:
    """Read a file written by ``save_int_params`` back into the same tree (int arrays stay int)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"path: {path} is not a jquant int params file (format {metadata.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    return _decode(json.loads(metadata["tree"]), tensors)


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
