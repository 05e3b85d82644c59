"""Name normalisation between torch state_dict keys and Flax parameter paths.

Both sides are reduced to the same canonical key, a tuple of lower-level parts:

* separators ``.`` and ``/`` are equivalent, and an index suffix ``_N`` is a separate part, so torch
  ``layers.0.weight``, linen ``layers_0/kernel`` and nnx ``('layers', 0, 'kernel')`` all meet at
  ``('layers', '0', 'weight')``;
* leaf names are aliased: Flax ``kernel`` (Dense/Conv), ``scale`` (LayerNorm/BatchNorm/GroupNorm) and
  ``embedding`` (Embed) are torch ``weight``; Flax batch_stats ``mean``/``var`` are torch
  ``running_mean``/``running_var``;
* a leading Flax collection name (``params``, ``batch_stats``) is dropped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax

FLAX_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "mean": "running_mean",
    "var": "running_var",
}
COLLECTIONS = ("params", "batch_stats")
# torch buffers with no Flax counterpart: skipped on import, recreated on export
TORCH_ONLY_LEAVES = ("num_batches_tracked",)
_INDEXED = re.compile(r"^(.*\D)_(\d+)$")


def split_name(name: str) -> list[str]:
    """Split a torch-style or Flax-style name on ``.`` and ``/``."""
    return [p for p in re.split(r"[./]", name) if p]


def _split_index(part: str) -> list[str]:
    match = _INDEXED.match(part)
    return [match.group(1), match.group(2)] if match else [part]


def canonical_key(parts: Sequence[str]) -> tuple[str, ...]:
    """Canonical key of a name given as parts (module parts, then the leaf name)."""
    if not parts:
        raise ValueError("name: empty parameter name")
    *modules, leaf = (str(p) for p in parts)
    out: list[str] = []
    for part in modules:
        out.extend(_split_index(part))
    out.append(FLAX_LEAF_TO_TORCH.get(leaf, leaf))
    return tuple(out)


def flax_parts(path: Sequence[Any]) -> list[str]:
    """Parts of a jax key path (linen dict, nnx State, any pytree); nnx's ``.value`` is dropped."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return parts


def strip_collection(parts: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split a leading linen collection name off a path."""
    if len(parts) > 1 and parts[0] in COLLECTIONS:
        return parts[0], list(parts[1:])
    return None, list(parts)


def default_flax_parts(torch_name: str, leaf: str) -> list[str]:
    """Linen-style path for a torch name when there is no template: ``layers.0.weight`` ->
    ``['layers_0', leaf]`` (indices joined to the preceding module name as linen does)."""
    parts = split_name(torch_name)[:-1]
    out: list[str] = []
    for part in parts:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return [*out, leaf]


def default_torch_name(parts: Sequence[str]) -> str:
    """Torch-style name for a Flax path when there is no torch template: ``layers_0/kernel`` ->
    ``layers.0.weight``."""
    *modules, leaf = parts
    out: list[str] = []
    for part in modules:
        out.extend(_split_index(part))
    return ".".join([*out, FLAX_LEAF_TO_TORCH.get(leaf, leaf)])
