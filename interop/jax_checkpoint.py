"""JAX-side checkpoint files written by jquant-convert: safetensors, flax msgpack or orbax.

Each stores the variables tree plus jquant's conversion record (the mapping table and torch-only
extras) so that converting back to torch is exact:

* safetensors: tensors under ``/``-joined paths (``params/layers_0/kernel``); the record in the string
  metadata under ``jquant.mapping`` (JSON) and extras as tensors under ``__torch_extra__/<name>``;
* msgpack: ``{"variables": tree, "jquant": {"mapping": json, "extras": {...}}}`` (flax.serialization;
  restore it with ``flax.serialization.msgpack_restore(data)["variables"]``);
* orbax: a directory written by ``orbax.checkpoint.PyTreeCheckpointer`` holding the tree, and a
  ``jquant_mapping.json`` file next to orbax's own files.
Every write is atomic (temporary path in the destination directory, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from interop.atomic import atomic_path
from interop.errors import CheckpointError
from interop.flat_mapping import flatten_tree, unflatten_tree
from interop.mapping import MappingEntry
from interop.safetensors_io import read_safetensors, write_safetensors

FORMATS = ("safetensors", "msgpack", "orbax")
_EXTRA = "__torch_extra__/"
_MAPPING_FILE = "jquant_mapping.json"


def _record_json(entries: list[MappingEntry], extras_names: list[str]) -> str:
    rows = [[e.torch_name, e.flax_path, e.layout, list(e.torch_shape), list(e.flax_shape), e.dtype] for e in entries]
    return json.dumps({"version": 1, "entries": rows, "extras": extras_names})


def _parse_record(text: Any, source: str) -> list[MappingEntry] | None:
    if text is None:
        return None
    if not isinstance(text, str | bytes):
        raise CheckpointError(
            f"{source}: corrupted jquant mapping record: 'mapping' must be a JSON string, got {type(text).__name__}"
        )
    try:
        rows = json.loads(text)["entries"]
        return [MappingEntry(r[0], r[1], r[2], tuple(r[3]), tuple(r[4]), r[5]) for r in rows]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
        raise CheckpointError(f"{source}: corrupted jquant mapping record ({err})") from err


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:  # pragma: no cover - installed in the dev environment
        raise ImportError("the orbax format needs orbax-checkpoint: `pip install orbax-checkpoint`") from err
    return ocp


def format_for_path(path: str, explicit: str | None = None) -> str:
    if explicit is not None:
        if explicit not in FORMATS:
            raise ValueError(f"format: {explicit!r} is not one of {', '.join(FORMATS)}")
        return explicit
    if path.endswith(".safetensors"):
        return "safetensors"
    if path.endswith(".msgpack"):
        return "msgpack"
    return "orbax"


def save_jax_checkpoint(
    tree: dict[str, Any],
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    entries: list[MappingEntry] | None = None,
    extras: dict[str, np.ndarray] | None = None,
) -> str:
    """Write ``tree`` (nested dicts of numpy arrays) with its conversion record; returns the format used."""
    path = os.fspath(path)
    fmt = format_for_path(path, fmt)
    extras = extras or {}
    record = _record_json(entries or [], sorted(extras))
    if fmt == "safetensors":
        flat = {k: np.asarray(v) for k, v in flatten_tree(tree, source=path).items()}
        clash = [k for k in flat if k.startswith(_EXTRA)]
        if clash:
            raise CheckpointError(f"{path}: tree path {clash[0]!r} uses the prefix {_EXTRA!r} reserved for extras")
        flat.update({_EXTRA + k: np.asarray(v) for k, v in extras.items()})
        with atomic_path(path) as tmp:
            write_safetensors(tmp, flat, {"jquant.mapping": record})
    elif fmt == "msgpack":
        from flax import serialization

        payload = {"variables": tree, "jquant": {"mapping": record, "extras": dict(extras)}}
        data = serialization.msgpack_serialize(payload)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            fh.write(data)
    else:
        ocp = _orbax()
        with atomic_path(path, directory=True) as tmp:
            ocp.PyTreeCheckpointer().save(
                tmp, {"variables": tree, "extras": dict(extras)} if extras else {"variables": tree}
            )
            with open(os.path.join(tmp, _MAPPING_FILE), "w") as fh:
                fh.write(record)
    return fmt


def load_jax_checkpoint(
    path: str | os.PathLike, *, fmt: str | None = None
) -> tuple[dict[str, Any], list[MappingEntry] | None, dict[str, np.ndarray]]:
    """Read a checkpoint written by :func:`save_jax_checkpoint` (or a plain one by other tools):
    ``(tree, mapping entries or None, torch extras)``."""
    path = os.fspath(path)
    fmt = format_for_path(path, fmt)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: file not found")
    if fmt == "safetensors":
        flat, metadata = read_safetensors(path)
        extras = {k[len(_EXTRA) :]: v for k, v in flat.items() if k.startswith(_EXTRA)}
        tree = unflatten_tree({k: v for k, v in flat.items() if not k.startswith(_EXTRA)}, source=path)
        return tree, _parse_record(metadata.get("jquant.mapping"), path), extras
    if fmt == "msgpack":
        from flax import serialization

        try:
            with open(path, "rb") as fh:
                payload = serialization.msgpack_restore(fh.read())
        except Exception as err:  # msgpack raises several unrelated types on bad input
            raise CheckpointError(f"{path}: not a readable flax msgpack file ({err})") from err
        if isinstance(payload, dict) and "variables" in payload and "jquant" in payload:
            meta = payload["jquant"]
            if not isinstance(meta, dict):
                raise CheckpointError(
                    f"{path}: key 'jquant' must hold the conversion record (a dict with 'mapping' and 'extras'), "
                    f"got {type(meta).__name__}"
                )
            extras = meta.get("extras", {})
            if not isinstance(extras, dict):
                raise CheckpointError(f"{path}: key 'jquant/extras' must be a dict, got {type(extras).__name__}")
            variables = payload["variables"]
            if not isinstance(variables, dict):
                raise CheckpointError(f"{path}: key 'variables' must be a dict, got {type(variables).__name__}")
            return variables, _parse_record(meta.get("mapping"), path), dict(extras)
        if not isinstance(payload, dict):
            raise CheckpointError(f"{path}: expected a dict of variables, got {type(payload).__name__}")
        return payload, None, {}
    ocp = _orbax()
    try:
        restored = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable orbax checkpoint ({err})") from err
    record_path = os.path.join(path, _MAPPING_FILE)
    record = open(record_path).read() if os.path.exists(record_path) else None
    if record is not None:
        if not isinstance(restored, dict) or not isinstance(restored.get("variables"), dict):
            raise CheckpointError(f"{path}: has {_MAPPING_FILE} but no 'variables' dict")
        return restored["variables"], _parse_record(record, record_path), dict(restored.get("extras", {}))
    return restored, None, {}
