"""Link torch qparam records to jquant transform sites, and move qparams between both.

torch quantizes module *outputs* (``<m>.activation_post_process``, FX observers, ``quantize_per_tensor``
nodes), jquant quantizes site *inputs*: the qparams torch applies to the tensor a module reads become the
input qparams of the jquant site of that module. The links are an explicit, inspectable table
(:func:`link_sites`, :func:`format_links`): each row names the torch module and role, the jquant site and
qstate key, and how it was found:

* ``name``: weights by parameter name: the site's weight ``param_path`` (``params/fc1/kernel``, nnx
  ``layers/0/kernel``) against the torch module (``fc1``, ``layers.0``; an FX-fused ``fc1.0`` answers for
  ``fc1``), normalised as in :mod:`interop.names`; without a graph also FX ``<m>_input_scale_0`` inputs;
* ``graph``: by data flow, when the table was read with ``model=`` (the torch module or its FX GraphModule;
  see :mod:`interop.qgraph`): the record whose quantized tensor reaches the site's torch module (through relu,
  reshape, max-pool, dequantize, cat's shared qparams). Where jquant knows the input comes straight from site
  P, torch's record must quantize P's module output, else InteropError naming both sides. Output slots take
  the record of the module's output (fused patterns observe the same tensor), or for sites without a weight
  (add, cat) the record their consumers' inputs were linked to;
* ``producer``: without a graph, the site's input comes straight from another site, whose module's output is used;
* ``order``: without a graph only, the nearest module registered before the site's module that has output
  qparams: right for sequential models only, so link_sites warns listing these links;
* ``override``: given by the caller (``overrides={(torch_module, role): (site, key)}``).

Records that link nowhere (e.g. the last module's output) are listed by :func:`unlinked_records`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from interop.errors import InteropError
from interop.names import canonical_key, split_name, strip_collection
from interop.qparams import QParamRecord, QParamTable
from jquant.numerics.qtypes import qrange
from jquant.text_table import format_table
from jquant.transform.slots import LearnableSlot, ObservedSlot


@dataclass(frozen=True)
class SiteLink:
    """One row of the torch <-> jquant table."""

    torch_module: str
    torch_role: str
    site: str
    key: str
    how: str


def _module_key(parts: Sequence[str]) -> tuple[str, ...]:
    return canonical_key([*parts, "_"])[:-1]


def _site_module(site: Any) -> tuple[str, ...] | None:
    for op in site.operands:
        if op.role == "weight" and op.param_path:
            _, parts = strip_collection(split_name(op.param_path))
            return _module_key(parts[:-1])
    return None


def _stateful_keys(site: Any, qstate: Mapping | None) -> set[str]:
    if qstate is not None:
        return set(qstate.get(site.name, {}))
    return {key for key, spec in site.specs.items() if spec is not None}


def _has_graph(table: QParamTable) -> bool:
    return any(rec.consumers is not None for roles in table.values() for rec in roles.values())


def _match_weights(table: QParamTable, sites: Sequence[Any]) -> dict[str, str]:
    """jquant site -> torch module holding its weight's qparams, by parameter name (``fc1/kernel`` <->
    ``fc1.weight``; an FX-fused ``fc1.0`` answers for ``fc1`` when no ``fc1`` weight record exists)."""
    weighted = [m for m, roles in table.items() if "weight" in roles]
    exact = {_module_key(split_name(m)): m for m in weighted}
    fused: dict[tuple[str, ...], list[str]] = {}
    for m in weighted:
        parts = split_name(m)
        if len(parts) > 1 and parts[-1] == "0":
            fused.setdefault(_module_key(parts[:-1]), []).append(m)
    out = {}
    for site in sites:
        key = _site_module(site)
        if key is None:
            continue
        if key in exact:
            out[site.name] = exact[key]
        elif len(fused.get(key, ())) == 1:
            out[site.name] = fused[key][0]
    return out


def _op_of(table: QParamTable, module: str) -> str:
    """The torch graph op that uses ``module``'s weight (the fused parent for ``fc1.0``)."""
    consumers = table[module]["weight"].consumers
    return consumers[0] if consumers else module


def _name(module: str, role: str) -> str:
    return f"torch {module or '<root>'} ({role})"


def link_sites(
    table: QParamTable,
    sites: Iterable[Any],
    *,
    qstate: Mapping | None = None,
    overrides: Mapping[tuple[str, str], tuple[str, str]] | None = None,
) -> list[SiteLink]:
    """The torch <-> jquant link table for ``table`` and ``sites`` (``qf.sites``); see the module doc.

    Raises InteropError when the torch graph and jquant's data flow disagree (a jquant site's input comes from
    site P, torch feeds the matching module from another op) or a slot has several torch candidates; both
    sides are named, and ``overrides`` settles it.
    """
    sites = [s for s in sites if s.quantized]
    graph = _has_graph(table)
    site_module = _match_weights(table, sites)
    overridden = {(site, key) for site, key in (overrides or {}).values()}
    records = [(m, r, rec) for m, roles in table.items() for r, rec in roles.items() if r != "weight"]
    links: list[SiteLink] = []
    by_slot: dict[tuple[str, str], SiteLink] = {}
    order = list(table)
    guessed: list[str] = []

    def add(link: SiteLink) -> None:
        links.append(link)
        by_slot[(link.site, link.key)] = link

    def producer_op(site_name: str | None) -> str | None:
        module = site_module.get(site_name) if site_name else None
        return _op_of(table, module) if module is not None else None

    def check_producer(site: Any, op: Any, module: str, role: str) -> None:
        """jquant says ``op`` comes straight from site P: torch's record must quantize P's module output."""
        want = producer_op(op.producer)
        got = table[module][role].producer
        if want is None or got is None or want == got:
            return
        raise InteropError(
            f"link {_name(module, role)} -> jquant {site.name}/{op.key}: jquant's {op.key} comes straight from site "
            f"{op.producer!r} (torch {want}), but in the torch graph {_name(module, role)} quantizes the output of "
            f"{got!r}. The models differ here; fix the model or pass overrides={{(torch_module, role): "
            f"({site.name!r}, {op.key!r})}}"
        )

    def pick(site: Any, op: Any, cands: list[tuple[str, str]], what: str) -> tuple[str, str] | None:
        if len(cands) > 1 and op.producer:
            want = producer_op(op.producer)
            narrowed = [c for c in cands if table[c[0]][c[1]].producer == want]
            cands = narrowed or cands
        if len(cands) > 1:
            names = ", ".join(_name(m, r) for m, r in cands)
            raise InteropError(
                f"jquant {site.name}/{op.key}: ambiguous, {what} reads several torch qparam sets ({names}); pass "
                f"overrides={{(torch_module, role): ({site.name!r}, {op.key!r})}} to choose"
            )
        return cands[0] if cands else None

    for site in sites:
        keys = _stateful_keys(site, qstate)
        module = site_module.get(site.name)
        for op in site.operands:
            if op.key not in keys or (site.name, op.key) in overridden:
                continue
            if op.role == "weight":
                if module is not None and op.param_path and "weight" in table[module]:
                    add(SiteLink(module, "weight", site.name, op.key, "name"))
                continue
            if graph:
                if module is not None:
                    torch_op = _op_of(table, module)
                    cands = [(m, r) for m, r, rec in records if rec.consumers and torch_op in rec.consumers]
                    found = pick(site, op, cands, f"torch {torch_op!r}")
                elif op.producer and producer_op(op.producer) is not None:
                    want = producer_op(op.producer)
                    cands = [(m, r) for m, r, rec in records if r == "output" and rec.producer == want]
                    found = pick(site, op, cands, f"the output of torch {want!r}")
                else:
                    found = None
                if found is not None:
                    check_producer(site, op, *found)
                    add(SiteLink(found[0], found[1], site.name, op.key, "graph"))
                continue
            if module is not None and "input" in table[module]:
                add(SiteLink(module, "input", site.name, op.key, "name"))
                continue
            producer = site_module.get(op.producer) if op.producer else None
            if producer is not None and "output" in table[producer]:
                add(SiteLink(producer, "output", site.name, op.key, "producer"))
                continue
            if module is not None and op.producer is None:
                # no torch graph: the nearest module registered before this one (right for sequential models only)
                before = [m for m in order[: order.index(module)] if "output" in table[m]]
                if before:
                    add(SiteLink(before[-1], "output", site.name, op.key, "order"))
                    guessed.append(f"{site.name}/{op.key} <- {_name(before[-1], 'output')}")
    # output slots: the record of the torch module's output (fused patterns observe the same tensor), or,
    # for a site without a weight (add, cat), the record its consumers' inputs were linked to
    for site in sites:
        if "output" not in _stateful_keys(site, qstate) or (site.name, "output") in overridden:
            continue
        module = site_module.get(site.name)
        found = None
        if graph and module is not None:
            torch_op = _op_of(table, module)
            cands = [(m, r) for m, r, rec in records if r == "output" and rec.producer == torch_op]
            if len(cands) > 1 and _same_qparams([table[m][r] for m, r in cands]):
                # one shared observer requantizing after share-qparams ops (the reference graph's avg / max pool
                # re-quantizes with its own copy of the producer's qparams): the module's own record
                cands = sorted(cands, key=lambda c: c[0] != module)[:1]
            if len(cands) > 1:
                names = ", ".join(_name(m, r) for m, r in cands)
                raise InteropError(f"jquant {site.name}/output: ambiguous, torch {torch_op!r} output has {names}")
            found = cands[0] if cands else None
        if found is None and graph and module is None:
            found = _output_through_inputs(table, records, site, producer_op)
        if found is None:
            fed = {
                (lk.torch_module, lk.torch_role)
                for other in sites
                for op in other.operands
                if op.producer == site.name and (lk := by_slot.get((other.name, op.key))) is not None
            }
            if len(fed) > 1:
                names = ", ".join(_name(m, r) for m, r in sorted(fed))
                raise InteropError(
                    f"jquant {site.name}/output: its consumers are linked to different torch qparams ({names})"
                )
            found = next(iter(fed), None)
        if found is not None:
            add(SiteLink(found[0], found[1], site.name, "output", "graph" if graph else "producer"))
    if guessed:
        warnings.warn(
            "link_sites: no torch graph (the table was read without model=), so these activation links follow "
            f"module registration order, which is right for sequential models only: {'; '.join(guessed)}. Pass "
            "model= (the torch module or its FX GraphModule) to link by data flow, or check them with print_links",
            stacklevel=2,
        )
    for (mod, role), (site_name, key) in (overrides or {}).items():
        if mod not in table or role not in table[mod]:
            raise InteropError(f"overrides: torch module {mod!r} has no {role} qparams in the table")
        links = [lk for lk in links if (lk.site, lk.key) != (site_name, key)]
        links.append(SiteLink(mod, role, site_name, key, "override"))
    return links


def _same_qparams(recs: list[QParamRecord]) -> bool:
    first = recs[0]
    return all(
        rec.dtype == first.dtype and np.array_equal(rec.scale, first.scale)
        and np.array_equal(rec.zero_point, first.zero_point) for rec in recs[1:]
    )


def _output_through_inputs(table: QParamTable, records: list, site: Any, producer_op: Any) -> tuple[str, str] | None:
    """A site without a weight (add, cat): the torch op that consumes what its inputs' producer modules output
    (one op common to all of them), and that op's output record."""
    common: set[str] | None = None
    for op in site.operands:
        want = producer_op(op.producer) if op.role == "input" and op.producer else None
        if want is None:
            continue
        users = {c for m, r, rec in records if r == "output" and rec.producer == want for c in rec.consumers or ()}
        common = users if common is None else common & users
    if not common:
        return None
    weighted = {c for roles in table.values() if "weight" in roles for c in roles["weight"].consumers or ()}
    common -= weighted
    if len(common) > 1:
        raise InteropError(f"jquant {site.name}/output: ambiguous, its inputs meet at torch ops {sorted(common)}")
    if not common:
        return None
    (torch_op,) = common
    cands = [(m, r) for m, r, rec in records if r == "output" and rec.producer == torch_op]
    if len(cands) > 1:
        names = ", ".join(_name(m, r) for m, r in cands)
        raise InteropError(f"jquant {site.name}/output: ambiguous, torch {torch_op!r} output has {names}")
    return cands[0] if cands else None


def unlinked_records(table: QParamTable, links: Iterable[SiteLink]) -> list[tuple[str, str]]:
    used = {(lk.torch_module, lk.torch_role) for lk in links}
    return [(m, r) for m, roles in table.items() for r in roles if (m, r) not in used]


def format_links(links: Sequence[SiteLink], table: QParamTable | None = None) -> str:
    """The link table as text: torch module, torch role, jquant site, qstate key, how it was found."""
    rows = [(lk.torch_module or "<root>", lk.torch_role, lk.site, lk.key, lk.how) for lk in links]
    lines = [format_table(("torch module", "role", "jquant site", "key", "how"), rows)]
    if table is not None:
        lines += [f"not linked: {m or '<root>'} ({r})" for m, r in unlinked_records(table, links)]
    return "\n".join(lines)


def print_links(links: Sequence[SiteLink], table: QParamTable | None = None) -> None:
    print(format_links(links, table))


def _spec_of(site: Any, key: str) -> Any:
    return site.output_spec if key == "output" else site.operand(key).spec


def _check_spec(rec: QParamRecord, spec: Any, where: str) -> str | None:
    if spec is None or not hasattr(spec, "dtype"):
        return None
    want = qrange(spec.dtype, spec.quant_min, spec.quant_max)
    if (rec.quant_min, rec.quant_max) != want:
        return (
            f"{where}: jquant spec {spec.dtype} range {want} but torch {rec.module or '<root>'} ({rec.role}) is "
            f"{rec.dtype} ({rec.quant_min}, {rec.quant_max}); use interop.spec_from_record(record)"
        )
    return None


def spec_from_record(rec: QParamRecord, **kwargs: Any) -> Any:
    """A ``jquant.transform.QuantizationSpec`` with the record's dtype, qscheme and integer range."""
    from jquant.transform import QuantizationSpec

    return QuantizationSpec(rec.dtype, rec.qscheme, quant_min=rec.quant_min, quant_max=rec.quant_max, **kwargs)


def qparams_to_qstate(
    table: QParamTable,
    qstate: Mapping[str, Any],
    sites: Iterable[Any],
    *,
    links: Sequence[SiteLink] | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """A copy of ``qstate`` (from ``qf.init``) with scale / zero point (and observer min / max when the
    record has them) taken from the torch records, per the link table.

    With ``strict`` a record whose integer range differs from the site's spec, or a qstate slot that no
    record fills, is an error (listing them); shapes must always agree.
    """
    sites = list(sites)
    by_name = {s.name: s for s in sites}
    links = list(links) if links is not None else link_sites(table, sites, qstate=qstate)
    out = {name: dict(slots) for name, slots in qstate.items()}
    problems = []
    filled = set()
    for lk in links:
        rec = table[lk.torch_module][lk.torch_role]
        slot = out.get(lk.site, {}).get(lk.key)
        if slot is None:
            raise InteropError(f"link {lk}: qstate has no slot {lk.site!r}/{lk.key!r}")
        if isinstance(slot, LearnableSlot):
            raise InteropError(f"{lk.site}/{lk.key}: LSQ slots are not supported by import yet")
        note = _check_spec(rec, _spec_of(by_name[lk.site], lk.key), f"{lk.site}/{lk.key}")
        if note:
            problems.append(note)
        obs = slot.observer
        if hasattr(obs, "_replace") and hasattr(obs, "min_val"):
            # converted / reference checkpoints keep no observer range: the one the qparams cover stands in, so
            # jquant sees an observed slot (it neither recomputes weight qparams nor warns "never ran")
            lo, hi = (rec.min_val, rec.max_val) if rec.min_val is not None else _range_of(rec)
            obs = obs._replace(
                min_val=_fit(lo, obs.min_val, np.float32, f"{lk.site}/{lk.key} min_val", rec),
                max_val=_fit(hi, obs.max_val, np.float32, f"{lk.site}/{lk.key} max_val", rec),
            )
        out[lk.site][lk.key] = ObservedSlot(
            observer=obs,
            scale=_fit(rec.scale, slot.scale, np.float32, f"{lk.site}/{lk.key} scale", rec),
            zero_point=_fit(
                rec.zero_point,
                slot.zero_point,
                np.asarray(slot.zero_point).dtype,
                f"{lk.site}/{lk.key} zero_point",
                rec,
            ),
        )
        filled.add((lk.site, lk.key))
    empty = [f"{s}/{k}" for s, slots in qstate.items() for k in slots if (s, k) not in filled]
    if empty:
        graph = _has_graph(table)
        hint = (
            "the torch graph has no qparams for them (check the link table below), or link them with overrides="
            if graph
            else "pass model= (the torch module or its FX GraphModule) so activations are linked through its "
            "graph, or link them with overrides="
        )
        problems.append(f"qstate slots with no torch qparams: {empty}; {hint}")
    if strict and problems:
        raise InteropError("import_qparams:\n  " + "\n  ".join(problems) + "\nlinks:\n" + format_links(links, table))
    return out


def _range_of(rec: QParamRecord) -> tuple[np.ndarray, np.ndarray]:
    """The float range ``[(qmin - zp) * scale, (qmax - zp) * scale]`` the record's qparams represent."""
    scale = np.asarray(rec.scale, np.float64)
    zp = np.asarray(rec.zero_point, np.float64)
    return (rec.quant_min - zp) * scale, (rec.quant_max - zp) * scale


def _fit(value: Any, like: Any, dtype: Any, where: str, rec: QParamRecord) -> np.ndarray:
    arr = np.asarray(value)
    shape = np.shape(like)
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise InteropError(
            f"{where}: torch {rec.module or '<root>'} ({rec.role}) has {arr.size} value(s) {arr.shape}, "
            f"the qstate slot has shape {shape}"
        )
    if np.issubdtype(arr.dtype, np.floating) and np.issubdtype(np.dtype(dtype), np.integer):
        if not np.array_equal(arr, np.round(arr)):
            raise InteropError(f"{where}: float zero points cannot go into an integer qstate slot")
    return arr.astype(dtype).reshape(shape)


def qstate_to_qparams(qstate: Mapping[str, Any], sites: Iterable[Any], links: Sequence[SiteLink]) -> QParamTable:
    """The torch records a link table describes, filled from ``qstate`` (dtype / range from the specs).

    A torch record linked to several sites takes the first link's values.
    """
    by_name = {s.name: s for s in sites}
    table: QParamTable = {}
    for lk in links:
        if lk.torch_role in table.get(lk.torch_module, {}):
            continue
        slot = qstate[lk.site][lk.key]
        spec = _spec_of(by_name[lk.site], lk.key)
        lo, hi = qrange(spec.dtype, spec.quant_min, spec.quant_max)
        obs = slot.observer
        has_mm = hasattr(obs, "min_val")
        per_channel = np.size(slot.scale) > 1 or "per_channel" in spec.qscheme
        table.setdefault(lk.torch_module, {})[lk.torch_role] = QParamRecord(
            module=lk.torch_module,
            role=lk.torch_role,
            scale=np.asarray(slot.scale),
            zero_point=np.asarray(slot.zero_point),
            axis=0 if per_channel else None,
            dtype=spec.dtype,
            qscheme=spec.qscheme,
            quant_min=lo,
            quant_max=hi,
            source=f"jquant:{lk.site}/{lk.key}",
            min_val=np.asarray(obs.min_val) if has_mm else None,
            max_val=np.asarray(obs.max_val) if has_mm else None,
        )
    return table
