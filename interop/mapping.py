"""Map a torch state_dict onto a Flax params template (linen dict, nnx State, any pytree) and back.

Matching is by canonical name (see :mod:`interop.names`), the layout by the Flax leaf name and rank
(see :mod:`interop.layouts`); user rules rename torch names, set layouts, or replace the naming with a
callable. ``num_batches_tracked`` (a torch BatchNorm counter with no Flax counterpart) is skipped on
import and recreated on export (from the torch template, or 0). Values keep their dtype and bits: no
casts, no rounding; leaves come back as numpy arrays.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from interop.errors import MappingError
from interop.layouts import check_layout, flax_to_torch_layout, infer_layout, torch_to_flax_layout
from interop.names import (
    TORCH_ONLY_LEAVES,
    canonical_key,
    default_torch_name,
    flax_parts,
    split_name,
    strip_collection,
)
from interop.records import QuantizedTensor
from jquant.text_table import format_table


@dataclass(frozen=True)
class Rule:
    """A user mapping rule, matched (``re.search``) against the torch name.

    ``rename``: replacement for ``re.sub`` giving the name to match against the Flax side (torch or
    Flax style, e.g. ``r"features/layers/\\1"``). ``layout``: force a layout (``"conv_transpose"``,
    ``"embedding"``, ...). A ``(pattern, replacement)`` tuple is shorthand for a rename rule.
    """

    pattern: str
    rename: str | None = None
    layout: str | None = None

    def __post_init__(self) -> None:
        re.compile(self.pattern)
        if self.layout is not None:
            check_layout(self.layout)


# A callable rule receives the (already renamed) torch name and returns a new name, or None to ignore it.
NameFn = Callable[[str], "str | None"]
RuleLike = Rule | tuple[str, str] | NameFn


def normalize_rules(rules: Iterable[RuleLike] | RuleLike | None) -> list[Rule | NameFn]:
    if rules is None:
        return []
    if isinstance(rules, Rule) or callable(rules):
        rules = [rules]
    out: list[Rule | NameFn] = []
    for rule in rules:
        if isinstance(rule, Rule) or (callable(rule) and not isinstance(rule, tuple)):
            out.append(rule)
        elif isinstance(rule, tuple) and len(rule) == 2 and all(isinstance(r, str) for r in rule):
            out.append(Rule(rule[0], rename=rule[1]))
        else:
            raise TypeError(f"rules: expected Rule, (regex, replacement) or callable, got {rule!r}")
    return out


def apply_rules(name: str, rules: Sequence[Rule | NameFn]) -> tuple[str | None, str | None]:
    """The renamed torch name (None: ignored by a rule) and a forced layout (or None)."""
    layout = None
    current: str | None = name
    for rule in rules:
        if current is None:
            break
        if isinstance(rule, Rule):
            if re.search(rule.pattern, current):
                if rule.layout is not None:
                    layout = rule.layout
                if rule.rename is not None:
                    current = re.sub(rule.pattern, rule.rename, current)
        else:
            result = rule(current)
            if result is not None and not isinstance(result, str):
                raise TypeError(f"rules: callable returned {result!r} for {name!r}; expected a str or None")
            current = result
    return current, layout


@dataclass(frozen=True)
class MappingEntry:
    """One matched parameter: torch name <-> Flax path, with shapes and the layout transform."""

    torch_name: str
    flax_path: str
    layout: str
    torch_shape: tuple[int, ...]
    flax_shape: tuple[int, ...]
    dtype: str


@dataclass
class MappingReport:
    """Result of matching both sides; ``ok`` when nothing is unmatched or mismatched."""

    entries: list[MappingEntry] = field(default_factory=list)
    unmatched_torch: list[str] = field(default_factory=list)
    unmatched_flax: list[str] = field(default_factory=list)
    mismatched: list[MappingEntry] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unmatched_torch or self.unmatched_flax or self.mismatched)

    def problems(self) -> str:
        lines = []
        if self.unmatched_torch:
            lines.append(f"torch keys with no Flax match ({len(self.unmatched_torch)}):")
            lines += [f"  {k}" for k in self.unmatched_torch]
        if self.unmatched_flax:
            lines.append(f"Flax paths with no torch match ({len(self.unmatched_flax)}):")
            lines += [f"  {k}" for k in self.unmatched_flax]
        if self.mismatched:
            lines.append(f"shape mismatches ({len(self.mismatched)}; torch shape in the Flax layout vs Flax shape):")
            lines += [
                f"  {e.torch_name} -> {e.flax_path}: {e.torch_shape} vs {e.flax_shape} (layout {e.layout})"
                for e in self.mismatched
            ]
        return "\n".join(lines)

    def table(self) -> str:
        """The mapping table: torch name, Flax path, torch shape, Flax shape, dtype, layout transform."""
        header = ("torch name", "flax path", "torch shape", "flax shape", "dtype", "layout")
        rows = [
            (e.torch_name, e.flax_path, str(e.torch_shape), str(e.flax_shape), e.dtype, e.layout) for e in self.entries
        ]
        lines = [format_table(header, rows)]
        lines += [f"ignored: {name}" for name in self.ignored]
        if not self.ok:
            lines.append(self.problems())
        return "\n".join(lines)


def _as_numpy(name: str, value: Any) -> np.ndarray | None:
    """Array of a state_dict value; None for dtype/qscheme names (metadata, not parameters)."""
    if isinstance(value, str):
        return None
    if isinstance(value, QuantizedTensor):
        raise MappingError(
            f"{name}: is a quantized tensor; map float weights here and import its qparams with interop.import_qparams"
        )
    if type(value).__module__.startswith("torch"):
        from interop.tensors import to_numpy

        result = to_numpy(value, name)
        return None if isinstance(result, str) else _as_numpy(name, result)
    return np.asarray(value)


def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in getattr(value, "shape", np.shape(value)))


def _match(
    torch_names: Iterable[str], flax_leaves: list[tuple[str, list[str], Any]], rules: Sequence[Rule | NameFn]
) -> tuple[dict[str, tuple[int, str | None]], list[str], list[str], list[str]]:
    """Pair torch names with Flax leaves. Returns {torch name: (flax index, forced layout)}, the
    unmatched torch names, the unmatched Flax paths, and the ignored torch names."""
    # Leaves are found by their literal name first (``conv/kernel``), then by the torch alias (``conv.weight``).
    # One module may hold two leaves with the same alias (ConvBN: ``kernel`` and ``scale`` are both torch
    # ``weight``): the alias is then ambiguous and only a rule naming the Flax leaf reaches them.
    flax_by_literal: dict[tuple[str, ...], int] = {}
    flax_by_key: dict[tuple[str, ...], list[int]] = {}
    for i, (path, parts, _) in enumerate(flax_leaves):
        module_parts = strip_collection(parts)[1]
        literal = _literal_key(module_parts)
        if literal in flax_by_literal:
            other = flax_leaves[flax_by_literal[literal]][0]
            raise MappingError(f"template: Flax paths {other} and {path} normalise to the same name {literal}")
        flax_by_literal[literal] = i
        flax_by_key.setdefault(canonical_key(module_parts), []).append(i)
    pairs: dict[str, tuple[int, str | None]] = {}
    claimed: dict[int, str] = {}
    unmatched, ignored = [], []
    for name in torch_names:
        if split_name(name)[-1] in TORCH_ONLY_LEAVES:
            ignored.append(name)
            continue
        target, layout = apply_rules(name, rules)
        if target is None:
            ignored.append(name)
            continue
        index = flax_by_literal.get(_literal_key(split_name(target)))
        if index is None:
            candidates = flax_by_key.get(canonical_key(split_name(target)), [])
            if len(candidates) > 1:
                paths = [flax_leaves[c][0] for c in candidates]
                raise MappingError(
                    f"torch key {name!r} matches Flax paths {paths} (same torch name); add a rule renaming it to "
                    "the Flax leaf, e.g. Rule(r'^conv\\.weight$', 'conv/kernel')"
                )
            if not candidates:
                unmatched.append(name)
                continue
            index = candidates[0]
        if index in claimed:
            raise MappingError(
                f"torch keys {claimed[index]!r} and {name!r} both map to Flax path {flax_leaves[index][0]}"
            )
        claimed[index] = name
        pairs[name] = (index, layout)
    unmatched_flax = [path for i, (path, _, _) in enumerate(flax_leaves) if i not in claimed]
    return pairs, unmatched, unmatched_flax, ignored


def _literal_key(parts: Sequence[str]) -> tuple[str, ...]:
    """Canonical key without the leaf alias: ``layers_0/kernel`` -> ``('layers', '0', 'kernel')``."""
    return (*canonical_key([*parts[:-1], "_"])[:-1], str(parts[-1]))


def _flatten_template(tree: Any) -> tuple[list[tuple[str, list[str], Any]], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out = []
    for path, leaf in leaves:
        parts = flax_parts(path)
        out.append(("/".join(parts), parts, leaf))
    return out, treedef


def torch_to_flax(
    state_dict: Mapping[str, Any],
    template: Any,
    rules: Iterable[RuleLike] | RuleLike | None = None,
    *,
    strict: bool = True,
    with_report: bool = False,
) -> Any:
    """Fill ``template`` (linen variables/params dict, nnx State, or any pytree; leaves may be arrays or
    ``jax.ShapeDtypeStruct``) with the matching tensors of a torch ``state_dict`` (torch tensors or the
    numpy dict of :func:`interop.load_torch_checkpoint`), rearranged into Flax layouts.

    Raises MappingError listing unmatched keys on both sides and shape mismatches unless
    ``strict=False`` (then unmatched template leaves keep their template value). With
    ``with_report=True`` returns ``(tree, MappingReport)``.
    """
    rules_ = normalize_rules(rules)
    arrays = {}
    ignored_meta = []
    for name, value in state_dict.items():
        arr = _as_numpy(name, value)
        if arr is None:
            ignored_meta.append(name)
        else:
            arrays[name] = arr
    flax_leaves, treedef = _flatten_template(template)
    pairs, unmatched_torch, unmatched_flax, ignored = _match(arrays, flax_leaves, rules_)
    report = MappingReport(unmatched_torch=unmatched_torch, unmatched_flax=unmatched_flax)
    report.ignored = ignored + ignored_meta
    new_leaves = [leaf for _, _, leaf in flax_leaves]
    for name, (index, forced) in pairs.items():
        path, parts, leaf = flax_leaves[index]
        src = arrays[name]
        layout = forced or infer_layout(parts[-1], src.ndim)
        try:
            converted = torch_to_flax_layout(src, layout)
        except ValueError as err:  # wrong rank for the layout: report it as a mismatch
            report.mismatched.append(
                MappingEntry(name, path, f"{layout} ({err})", _shape_of(src), _shape_of(leaf), str(src.dtype))
            )
            continue
        entry = MappingEntry(name, path, layout, _shape_of(converted), _shape_of(leaf), str(src.dtype))
        if entry.torch_shape != entry.flax_shape:
            report.mismatched.append(entry)
            continue
        report.entries.append(entry)
        new_leaves[index] = converted
    if strict and not report.ok:
        raise MappingError("torch -> Flax mapping failed (pass strict=False to allow):\n" + report.problems())
    tree = jax.tree_util.tree_unflatten(treedef, new_leaves)
    return (tree, report) if with_report else tree


def flax_to_torch(
    params: Any,
    torch_template: Mapping[str, Any] | None = None,
    rules: Iterable[RuleLike] | RuleLike | None = None,
    *,
    strict: bool = True,
    with_report: bool = False,
    as_torch: bool = True,
) -> Any:
    """Inverse of :func:`torch_to_flax`: a torch state_dict from Flax params (linen dict, nnx State, ...).

    With ``torch_template`` (e.g. ``model.state_dict()``: names and shapes; values unused except for
    ``num_batches_tracked``) names are matched exactly as in :func:`torch_to_flax` with the same
    ``rules``, and the result loads with ``load_state_dict(strict=True)``. Without it, torch names
    are derived from the Flax paths (``layers_0/kernel`` -> ``layers.0.weight``; layout rules still
    apply, rename rules cannot be inverted and are not used) and ``num_batches_tracked`` is 0.
    Returns torch tensors (``as_torch=True``) or numpy arrays.
    """
    rules_ = normalize_rules(rules)
    flax_leaves, _ = _flatten_template(params)
    report = MappingReport()
    out: dict[str, Any] = {}
    if torch_template is None:
        _export_by_default_names(flax_leaves, rules_, out, report)
    else:
        _export_onto_template(flax_leaves, torch_template, rules_, out, report)
    if strict and not report.ok:
        raise MappingError("Flax -> torch mapping failed (pass strict=False to allow):\n" + report.problems())
    if as_torch:
        from interop.tensors import to_torch

        out = {k: to_torch(v, k) for k, v in out.items()}
    return (out, report) if with_report else out


def _export_onto_template(flax_leaves, torch_template, rules, out, report) -> None:
    names = list(torch_template)
    pairs, unmatched_torch, unmatched_flax, ignored = _match(names, flax_leaves, rules)
    report.unmatched_torch, report.unmatched_flax = unmatched_torch, unmatched_flax
    for name in ignored:
        if split_name(name)[-1] in TORCH_ONLY_LEAVES:
            value = _as_numpy(name, torch_template[name])
            out[name] = np.zeros((), np.int64) if value is None else value
            report.ignored.append(f"{name} (copied from the torch template)")
        else:
            report.ignored.append(name)
            report.unmatched_torch.append(name)
    for name in names:
        if name not in pairs:
            continue
        index, forced = pairs[name]
        path, parts, leaf = flax_leaves[index]
        src = np.asarray(leaf)
        want = _shape_of(torch_template[name])
        layout = forced or infer_layout(parts[-1], src.ndim)
        try:
            converted = flax_to_torch_layout(src, layout)
        except ValueError as err:
            converted, layout = None, f"{layout} ({err})"
        if converted is None or _shape_of(converted) != want:
            got = "" if converted is None else f" gives torch shape {_shape_of(converted)}"
            shown = _in_flax_layout(want, layout)
            report.mismatched.append(MappingEntry(name, path, layout + got, shown, _shape_of(src), str(src.dtype)))
            continue
        entry = MappingEntry(name, path, layout, want, _shape_of(src), str(src.dtype))
        report.entries.append(entry)
        out[name] = converted


def _in_flax_layout(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """A torch shape as it reads in the Flax layout (unchanged when the layout does not apply)."""
    try:
        return _shape_of(torch_to_flax_layout(np.empty(shape, np.int8), layout.split(" ")[0]))
    except ValueError:
        return shape


def _export_by_default_names(flax_leaves, rules, out, report) -> None:
    for path, parts, leaf in flax_leaves:
        _, rest = strip_collection(parts)
        name = default_torch_name(rest)
        if name in out:
            raise MappingError(f"params: two Flax paths give the torch name {name!r} (second: {path})")
        src = np.asarray(leaf)
        _, forced = apply_rules(name, [r for r in rules if isinstance(r, Rule)])
        layout = forced or infer_layout(rest[-1], src.ndim)
        converted = flax_to_torch_layout(src, layout)
        out[name] = converted
        report.entries.append(MappingEntry(name, path, layout, _shape_of(converted), _shape_of(src), str(src.dtype)))
        if name.endswith(".running_mean"):
            counter = name[: -len("running_mean")] + "num_batches_tracked"
            out[counter] = np.zeros((), np.int64)
            report.ignored.append(f"{counter} (set to 0: Flax does not track it)")
