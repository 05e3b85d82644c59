"""Template-free conversion between a torch state_dict and a linen-style variables tree.

Used by the ``jquant-convert`` CLI, which has no Flax model to match against. Names follow linen's
conventions (``layers.0.weight`` -> ``params/layers_0/kernel``), and the layout follows the torch leaf
name and rank: a 2-d ``weight`` is a Linear (``kernel``, transposed), a rank >= 3 ``weight`` a Conv
(``kernel``, OIHW -> HWIO), a 1-d ``weight`` a norm ``scale``, ``running_mean``/``running_var`` go to
``batch_stats`` ``mean``/``var``. Embeddings and transposed convs cannot be told apart by rank: mark them
with ``Rule(pattern, layout="embedding" | "conv_transpose")``. ``num_batches_tracked`` is kept aside as
an extra so that the way back is bit-identical.

The mapping (one :class:`MappingEntry` per tensor) is stored with the JAX checkpoint; converting back
with it restores the exact torch names, layouts and extras.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from interop.errors import MappingError
from interop.layouts import flax_to_torch_layout, torch_to_flax_layout
from interop.mapping import MappingEntry, MappingReport, RuleLike, _as_numpy, apply_rules, normalize_rules
from interop.names import TORCH_ONLY_LEAVES, default_flax_parts, split_name


def _flax_leaf_and_layout(leaf: str, ndim: int, forced: str | None) -> tuple[str, str, str]:
    """(collection, Flax leaf name, layout) of a torch leaf."""
    if leaf == "running_mean":
        return "batch_stats", "mean", forced or "identity"
    if leaf == "running_var":
        return "batch_stats", "var", forced or "identity"
    if leaf != "weight":
        return "params", leaf, forced or "identity"
    layout = forced or ("linear" if ndim == 2 else "conv" if ndim >= 3 else "identity")
    name = {"embedding": "embedding", "identity": "scale"}.get(layout, "kernel")
    return "params", name, layout


def torch_to_tree(
    state_dict: Mapping[str, Any], rules: Iterable[RuleLike] | RuleLike | None = None
) -> tuple[dict[str, Any], MappingReport, dict[str, np.ndarray]]:
    """A linen-style ``{'params': ..., 'batch_stats': ...}`` tree from a torch state_dict, the report
    (its entries are the mapping table) and the torch-only extras (``num_batches_tracked``)."""
    rules_ = normalize_rules(rules)
    tree: dict[str, Any] = {}
    report = MappingReport()
    extras: dict[str, np.ndarray] = {}
    seen: dict[str, str] = {}
    for name, value in state_dict.items():
        arr = _as_numpy(name, value)
        if arr is None:
            raise MappingError(
                f"{name}: holds a torch dtype/qscheme name, not a tensor; this is a quantized "
                "model checkpoint: import its qparams with interop.import_qparams"
            )
        if split_name(name)[-1] in TORCH_ONLY_LEAVES:
            extras[name] = arr
            report.ignored.append(f"{name} (torch-only, kept as an extra)")
            continue
        target, forced = apply_rules(name, rules_)
        if target is None:
            report.ignored.append(f"{name} (ignored by a rule)")
            continue
        collection, leaf, layout = _flax_leaf_and_layout(split_name(target)[-1], arr.ndim, forced)
        parts = [collection, *default_flax_parts(target, leaf)]
        path = "/".join(parts)
        if path in seen:
            raise MappingError(f"torch keys {seen[path]!r} and {name!r} both map to Flax path {path}")
        seen[path] = name
        try:
            converted = torch_to_flax_layout(arr, layout)
        except ValueError as err:
            raise MappingError(f"{name}: {err}") from err
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MappingError(f"{name}: Flax path {path} collides with a parameter")
        node[parts[-1]] = converted
        report.entries.append(
            MappingEntry(name, path, layout, tuple(arr.shape), tuple(converted.shape), str(arr.dtype))
        )
    return tree, report, extras


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': x}}`` -> ``{'a/b': x}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_tree(value, path))
        else:
            out[path] = value
    return out


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def tree_to_torch(
    tree: Mapping[str, Any], entries: list[MappingEntry] | None, extras: Mapping[str, np.ndarray] | None = None
) -> tuple[dict[str, np.ndarray], MappingReport]:
    """Invert :func:`torch_to_tree` with its stored mapping entries (exact names and layouts). Paths
    without an entry (a tree written by other tools) get default names and inferred layouts."""
    from interop.mapping import flax_to_torch

    flat = flatten_tree(tree)
    by_path = {e.flax_path: e for e in entries or []}
    missing = [p for p in by_path if p not in flat]
    if missing:
        raise MappingError(f"checkpoint: the stored mapping lists paths absent from the tree: {missing[:10]}")
    out: dict[str, np.ndarray] = {}
    report = MappingReport()
    rest = {}
    for path, value in flat.items():
        entry = by_path.get(path)
        if entry is None:
            rest[path] = value
            continue
        arr = np.asarray(value)
        out[entry.torch_name] = flax_to_torch_layout(arr, entry.layout)
        report.entries.append(entry)
    if rest:
        default, default_report = flax_to_torch(unflatten_tree(rest), as_torch=False, with_report=True)
        clash = sorted(set(default) & set(out))
        if clash:
            raise MappingError(f"checkpoint: unmapped paths give torch names already used: {clash[:10]}")
        out.update(default)
        report.entries += default_report.entries
        report.ignored += default_report.ignored
    for name, value in (extras or {}).items():
        out[name] = np.asarray(value)
    return out, report
