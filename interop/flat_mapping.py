"""Template-free conversion between a torch state_dict and a linen-style variables tree.

Used by the ``jquant-convert`` CLI, which has no Flax model to match against. Names follow linen's
conventions (``layers.0.weight`` -> ``params/layers_0/kernel``), and the layout follows the torch leaf
name and rank: a 2-d ``weight`` is a Linear (``kernel``, transposed) unless its module's name says it is an
embedding (``embed``/``emb``/``wte``/``wpe`` in it: Flax ``nn.Embed``'s ``embedding``, unchanged), a rank >= 3
``weight`` a Conv (``kernel``, OIHW -> HWIO), a 1-d ``weight`` a norm ``scale``, ``running_mean`` /
``running_var`` go to ``batch_stats`` ``mean``/``var``. Rank cannot tell embeddings nor transposed convs for
sure: force a layout with ``Rule(pattern, layout="embedding" | "linear" | "conv_transpose")``; every layout
that is not the identity is listed by :func:`layout_decisions`. ``num_batches_tracked`` is kept aside as an
extra so that the way back is bit-identical. Two names that give one path are an error naming both.

The mapping (one :class:`MappingEntry` per tensor) is stored with the JAX checkpoint; converting back
with it restores the exact torch names, layouts and extras.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from interop.errors import MappingError
from interop.layouts import flax_to_torch_layout, torch_to_flax_layout
from interop.mapping import MappingEntry, MappingReport, Rule, RuleLike, _as_numpy, apply_rules, normalize_rules
from interop.names import TORCH_ONLY_LEAVES, default_flax_parts, split_name

_EMBEDDING_MODULE = re.compile(r"emb|^wte$|^wpe$", re.IGNORECASE)
_STRING_METADATA = re.compile(r"^(q?u?int\d+|float\d*|bfloat16|half|per_(tensor|channel)_\w+|float8_\w+)$")


def looks_like_embedding(torch_name: str) -> bool:
    """Whether the module owning this ``weight`` is named like an embedding (``embed_tokens``, ``wte``, ...)."""
    parts = [p for p in re.split(r"[./]", torch_name) if p]
    return len(parts) >= 2 and bool(_EMBEDDING_MODULE.search(parts[-2]))


def _flax_leaf_and_layout(leaf: str, ndim: int, forced: str | None, name: str = "") -> tuple[str, str, str]:
    """(collection, Flax leaf name, layout) of a torch leaf."""
    if leaf == "running_mean":
        return "batch_stats", "mean", forced or "identity"
    if leaf == "running_var":
        return "batch_stats", "var", forced or "identity"
    if leaf != "weight":
        return "params", leaf, forced or "identity"
    embedding = ndim == 2 and looks_like_embedding(name)
    layout = forced or ("embedding" if embedding else "linear" if ndim == 2 else "conv" if ndim >= 3 else "identity")
    name = {"embedding": "embedding", "identity": "scale"}.get(layout, "kernel")
    return "params", name, layout


_LAYOUT_WORDS = {
    "linear": "Linear weight (out, in) -> Dense kernel (in, out): transposed",
    "conv": "Conv weight (O, I, *k) -> Conv kernel (*k, I, O): permuted",
    "conv_transpose": "ConvTranspose weight (I, O, *k) -> kernel (*k, I, O): permuted, spatial dims flipped",
    "embedding": "Embedding weight -> nn.Embed embedding: unchanged",
}


def layout_decisions(entries: Iterable[MappingEntry], rules: Iterable[RuleLike] | RuleLike | None = None,
                     to_torch: bool = False) -> list[str]:
    """One line per entry whose layout is not the identity or whose name changes beyond the separators,
    saying what was done and, for guesses, how to override it."""
    rules_ = normalize_rules(rules)
    lines = []
    for e in entries:
        forced = apply_rules(e.torch_name, [r for r in rules_ if isinstance(r, Rule)])[1]
        src, dst = (e.flax_path, e.torch_name) if to_torch else (e.torch_name, e.flax_path)
        shapes = (e.flax_shape, e.torch_shape) if to_torch else (e.torch_shape, e.flax_shape)
        notes = []
        if e.layout != "identity":
            notes.append(_LAYOUT_WORDS.get(e.layout, e.layout) + (" (--layout)" if forced else ""))
            pattern = re.escape(e.torch_name) + "$"
            if not forced and e.layout == "embedding":
                notes.append(f"guessed from the module name; --layout '{pattern}=linear' if it is a Linear")
            elif not forced and e.layout == "linear" and len(e.torch_shape) == 2 and e.torch_name.endswith("weight"):
                notes.append(f"--layout '{pattern}=embedding' if it is an Embedding")
            elif not forced and e.layout == "conv" and len(e.torch_shape) == 3:
                notes.append(
                    "a 3-d kernel is taken as a Conv1d kernel; if it is e.g. an attention DenseGeneral kernel "
                    f"use --layout '{pattern}=identity'"
                )
        if to_torch and re.search(r"_\d+(/|$)", e.flax_path):
            notes.append("indexed module names such as Block_0 become Block.0 (torch ModuleList style)")
        if notes:
            lines.append(f"{src} {shapes[0]} -> {dst} {shapes[1]}: " + "; ".join(notes))
    return lines


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
        if not split_name(name):
            raise MappingError(f"{name!r}: empty tensor name; every entry needs a name such as 'fc.weight'")
        target, forced = apply_rules(name, rules_)
        if target is None or not split_name(target):
            report.ignored.append(f"{name} (ignored by a rule)")
            continue
        arr = _as_numpy(name, value)
        if arr is None:
            if _STRING_METADATA.match(str(value)):
                raise MappingError(
                    f"{name}: holds the torch dtype/qscheme name {value!r}, not a tensor; this looks like a "
                    "quantized model checkpoint: import its qparams with interop.import_qparams"
                )
            raise MappingError(
                f"{name}: holds the string {str(value)[:60]!r}, not a tensor; jquant-convert converts tensors "
                f"only: remove the entry or skip it with --rename '^{re.escape(name)}$='"
            )
        if split_name(name)[-1] in TORCH_ONLY_LEAVES:
            extras[name] = arr
            report.ignored.append(f"{name} (torch-only, kept as an extra)")
            continue
        collection, leaf, layout = _flax_leaf_and_layout(split_name(target)[-1], arr.ndim, forced, target)
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
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                prefix = "/".join(parts[: depth + 1])
                raise MappingError(
                    f"torch keys {seen.get(prefix, prefix)!r} and {name!r} collide: {prefix} is a parameter and "
                    f"{path} would be inside it"
                )
        if parts[-1] in node:
            inner = next((n for p, n in seen.items() if p.startswith(path + "/")), path)
            raise MappingError(
                f"torch keys {inner!r} and {name!r} collide: {path} holds parameters and {name!r} maps onto it"
            )
        node[parts[-1]] = converted
        report.entries.append(
            MappingEntry(name, path, layout, tuple(arr.shape), tuple(converted.shape), str(arr.dtype))
        )
    return tree, report, extras


def flatten_tree(tree: Mapping[str, Any], prefix: str = "", source: str = "tree") -> dict[str, Any]:
    """``{'a': {'b': x}}`` -> ``{'a/b': x}``; keys that flatten to one path (``{'a/b': x, 'a': {'b': y}}``) or
    empty keys raise MappingError naming them."""
    out: dict[str, Any] = {}
    _flatten_into(tree, prefix, out, {}, source)
    return out


def _flatten_into(tree: Mapping[str, Any], prefix: str, out: dict, origins: dict, source: str, where: str = ""):
    for key, value in tree.items():
        here = where + f"[{key!r}]"
        if not str(key):
            raise MappingError(f"{source}: entry {here} has an empty name")
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            _flatten_into(value, path, out, origins, source, here)
            continue
        if path in out:
            raise MappingError(f"{source}: entries {origins[path]} and {here} both flatten to the path {path!r}")
        out[path] = value
        origins[path] = here


def unflatten_tree(flat: Mapping[str, Any], source: str = "tree") -> dict[str, Any]:
    """``{'a/b': x}`` -> ``{'a': {'b': x}}``; a path that is both a leaf and a prefix of another path
    (``a`` and ``a/b``) raises MappingError naming both."""
    tree: dict[str, Any] = {}
    leaves: dict[tuple[str, ...], str] = {}
    for path, value in flat.items():
        parts = str(path).split("/")
        if not all(parts):
            raise MappingError(f"{source}: path {path!r} has an empty part")
        node = tree
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MappingError(
                    f"{source}: paths {leaves[tuple(parts[: depth + 1])]!r} and {path!r} collide: the first is "
                    "a tensor and the second would be inside it"
                )
        if parts[-1] in node:
            inner = next((p for p in flat if str(p).startswith(path + "/")), path)
            raise MappingError(f"{source}: paths {inner!r} and {path!r} collide: {path!r} holds other tensors")
        node[parts[-1]] = value
        leaves[tuple(parts)] = path
    return tree


def tree_to_torch(
    tree: Mapping[str, Any],
    entries: list[MappingEntry] | None,
    extras: Mapping[str, np.ndarray] | None = None,
    rules: Iterable[RuleLike] | RuleLike | None = None,
    source: str = "checkpoint",
) -> tuple[dict[str, np.ndarray], MappingReport]:
    """Invert :func:`torch_to_tree` with its stored mapping entries (exact names and layouts). Paths
    without an entry (a tree written by other tools) get default names and inferred layouts (``rules``
    may force layouts by torch name). Two paths or extras giving one torch name raise MappingError."""
    from interop.mapping import flax_to_torch

    flat = flatten_tree(tree, source=source)
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
        if entry.torch_name in out:
            first = next(e.flax_path for e in report.entries if e.torch_name == entry.torch_name)
            raise MappingError(f"{source}: paths {first} and {path} both map to the torch name {entry.torch_name!r}")
        out[entry.torch_name] = flax_to_torch_layout(arr, entry.layout)
        report.entries.append(entry)
    if rest:
        default, default_report = flax_to_torch(
            unflatten_tree(rest, source), rules=rules, as_torch=False, with_report=True
        )
        clash = sorted(set(default) & set(out))
        if clash:
            raise MappingError(f"{source}: unmapped paths give torch names already used: {clash[:10]}")
        out.update(default)
        report.entries += default_report.entries
        report.ignored += default_report.ignored
    for name, value in (extras or {}).items():
        if name in out:
            raise MappingError(f"{source}: the torch extra {name!r} has the name of a converted tensor")
        out[name] = np.asarray(value)
    return out, report
