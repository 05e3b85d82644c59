"""The discovery pass: walk a traced jaxpr once, find and name the sites, match rules, record scopes.

The result, a ``Plan``, is what the interpreter needs to run the quantized function: which equations are
quantized sites (keyed by equation identity) and, for each higher-order equation, the names of the
quantized sites inside it (their qstate entries travel with that equation: stacked for scans, carried for
while loops, passed to every branch of a cond).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from jquant.transform import dataflow, patterns
from jquant.transform.dataflow import ACTIVATION, VarInfo
from jquant.transform.higher_order import Scope, known_names, rule_for
from jquant.transform.quantizer import Candidate, Quantizer, RuleQuantizer, as_quantizer
from jquant.transform.sites import Namer, Operand, Site, View, clean_name_stack, role_keys, site_base_name
from jquant.transform.specs import (
    DerivedQuantizationSpec,
    FixedQParamsSpec,
    QuantizationSpec,
    Rule,
    SharedQuantizationSpec,
)


class UnsupportedPrimitiveError(NotImplementedError):
    """A higher-order primitive jquant cannot look inside."""


@dataclasses.dataclass
class Plan:
    """Sites of one traced function and where their qstate entries live."""

    closed_jaxpr: ClosedJaxpr
    sites: list[Site]
    by_eqn: dict[int, Site | View]  # a site's own equation -> Site; other equations using its slots -> View
    inner: dict[int, tuple[str, ...]]
    unmatched_rules: tuple[Rule, ...]
    out_tree: Any = None  # pytree structure of fn's output (set by QuantizedFunction)
    # Site name -> the equations fused after its own (bias add, ReLU; the last is where its output is observed).
    fused_eqns: dict[str, tuple] = dataclasses.field(default_factory=dict)
    # Parameter path -> how many scans slice it per iteration (stacked layers: a [L, n] bias is per layer 1-D).
    stacked: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def quantized_sites(self) -> list[Site]:
        return [s for s in self.sites if s.quantized]

    @property
    def site_by_name(self) -> dict[str, Site]:
        return {s.name: s for s in self.sites}


def _sub_jaxprs(params: dict) -> list:
    found = []
    for value in params.values():
        values = value if isinstance(value, tuple | list) else (value,)
        found.extend(v for v in values if isinstance(v, Jaxpr | ClosedJaxpr))
    return found


def _is_float(aval) -> bool:
    return np.issubdtype(aval.dtype, np.floating)


def _static_per_tensor(spec) -> bool:
    return isinstance(spec, QuantizationSpec) and not spec.is_dynamic and not spec.per_channel


def _fixed(spec) -> bool:
    return isinstance(spec, FixedQParamsSpec)


class _Discovery:
    def __init__(self, quantizer: Quantizer):
        self.quantizer = quantizer
        self.candidates = set(quantizer.primitives)
        self.namer = Namer()
        self.sites: list[Site] = []
        self.by_eqn: dict[int, Site | View] = {}
        self.inner: dict[int, tuple[str, ...]] = {}
        self.keepalive: list = []  # equations whose id() keys the plan
        self.fallbacks: list[str] = []  # sites whose weight took the rule's weight_fallback spec
        # Graph options (fusion, implicit sharing): per-site bookkeeping finished in ``finish``.
        self.eqn_of: dict[str, object] = {}  # site name -> its equation
        self.fused: dict[str, tuple[str, ...]] = {}
        self.fused_eqns: dict[str, tuple] = {}
        self.output_var: dict[str, object] = {}  # site name -> the variable its output spec observes
        self.dropped: set[str] = set()  # sites whose output joined another observer (a concatenate group)
        self.use_counts: dict = {}
        self.average_kind: dict = {}  # id(div of an average) -> "avg_pool" / "mean" (it shares the summed slot)
        self.stacked: dict[str, int] = {}  # parameter path -> scans slicing it (filled by the scan rule)

    # -- walking -------------------------------------------------------------------------------------------
    def walk(self, jaxpr: Jaxpr, in_infos, ctx: Scope):
        """Returns (output infos, names of quantized sites found in this jaxpr, recursively)."""
        env = {v: dataflow.CONSTANT for v in jaxpr.constvars}  # closed-over arrays: constants, not activations
        env.update(zip(jaxpr.invars, in_infos, strict=True))
        names: list[str] = []
        graph = self.quantizer.fuse or self.quantizer.shares
        uses = patterns.use_counts(jaxpr) if graph else None
        if graph:
            self.use_counts.update(uses)
        users = patterns.consumers(jaxpr) if graph else None
        open_patterns: dict = {}  # tail output variable -> OpenPattern
        # Multi-equation ops: a softmax's last equation (its div) is the site when a rule names "softmax"; the
        # add and tanh inside a tanh-GELU are never sites.
        softmax = "softmax" in self.candidates
        needs_producers = softmax or self.candidates & {"add", "tanh"}
        producers = {v: e for e in jaxpr.eqns for v in e.outvars} if needs_producers else {}
        internal = patterns.composite_internals(jaxpr, producers) if producers else set()
        for eqn in jaxpr.eqns:
            infos = [dataflow.read_info(env, v) for v in eqn.invars]
            name = eqn.primitive.name
            if softmax and patterns.softmax_input(eqn, producers) is not None:
                name = "softmax"
            out_infos = [ACTIVATION] * len(eqn.outvars)
            if open_patterns and self._extend(eqn, infos, open_patterns, uses, env):
                continue
            for var in eqn.invars:  # this equation reads a pattern's output without joining it: close it
                if not isinstance(var, Literal) and var in open_patterns:
                    self._close(open_patterns.pop(var), var, env)
                    infos = [dataflow.read_info(env, v) for v in eqn.invars]
            derived = dataflow.derived_weight_info(name, infos)
            shared = self._share(eqn, infos, users, ctx) if graph and derived is None else None
            if derived is not None:  # arithmetic on weights only (a BN-folded kernel): a weight, never a site
                out_infos = [derived] * len(eqn.outvars)
            elif name == "optimization_barrier":
                out_infos = dataflow.barrier_infos(infos)
            elif shared is not None:
                out_infos = [shared] * len(eqn.outvars)
            elif name in self.candidates and id(eqn) not in internal:
                site = self.make_site(eqn, infos, ctx, name)
                if site.quantized:
                    names.append(site.name)
                    out_infos = [VarInfo(producer=site.name)] * len(eqn.outvars)
                    if graph:
                        out_infos[0] = self._open(site, eqn, open_patterns)
            elif eqn.params.get("name") in self.quantizer.opaque_calls and _sub_jaxprs(eqn.params):
                pass  # one float op to this backend (jax.nn.gelu for torch_x86): no sites inside
            elif self.quantizer.primitives and _sub_jaxprs(eqn.params):  # config=[]: nothing to look for
                out_infos, inner = self.walk_higher_order(eqn, infos, ctx)
                if inner:
                    self.inner[id(eqn)] = tuple(inner)
                    self.keepalive.append(eqn)
                    names.extend(inner)
            else:
                passed = dataflow.passthrough_info(name, infos)
                if passed is not None:
                    out_infos = [passed] * len(eqn.outvars)
            env.update(zip(eqn.outvars, out_infos, strict=True))
        for var, pattern in list(open_patterns.items()):
            self._close(pattern, var, env)
        return [dataflow.read_info(env, v) for v in jaxpr.outvars], names

    # -- fused patterns and implicit sharing (graph options of the quantizer) ------------------------------
    def _open(self, site: Site, eqn, open_patterns: dict) -> VarInfo:
        """Info of a new site's output; a pattern anchor stays open until its pattern is complete."""
        self.eqn_of[site.name] = eqn
        info = VarInfo(producer=site.name)
        if site.output_spec is None:
            return info
        if self.quantizer.fuse and site.primitive in patterns.ANCHORS and len(eqn.outvars) == 1:
            open_patterns[eqn.outvars[0]] = patterns.OpenPattern(site.name, site.primitive, eqn)
            return info
        self.output_var[site.name] = eqn.outvars[0]
        if self.quantizer.shares and (_static_per_tensor(site.output_spec) or _fixed(site.output_spec)):
            return VarInfo(producer=site.name, qparams_of=(site.name, "output"))
        return info

    def _extend(self, eqn, infos, open_patterns: dict, uses, env) -> bool:
        """Absorb ``eqn`` into the open pattern whose output it reads, if it continues it."""
        for var in eqn.invars:
            pattern = None if isinstance(var, Literal) else open_patterns.get(var)
            if pattern is not None and pattern.extend(eqn, infos, var, uses):
                del open_patterns[var]
                out = eqn.outvars[0]
                env[out] = VarInfo(producer=pattern.site_name)
                open_patterns[out] = pattern
                return True
        return False

    def _close(self, pattern: patterns.OpenPattern, var, env) -> None:
        """The pattern is complete: its output spec observes ``var`` (at a view on the tail equation)."""
        name = pattern.site_name
        self.output_var[name] = var
        if pattern.fused:
            self.fused[name] = tuple(pattern.fused)
            self.fused_eqns[name] = tuple(pattern.eqns)
            site = self._site(name)
            if not _static_per_tensor(site.output_spec):
                raise ValueError(
                    f"site {name!r}: a fused {site.primitive}+{'+'.join(pattern.fused)} output needs a static "
                    f"per-tensor QuantizationSpec, got {site.output_spec!r}"
                )
            self._view(pattern.tail, View(name, "output", site.output_spec, pattern.tail.primitive.name))
        if self.quantizer.shares and _static_per_tensor(self._site(name).output_spec):
            env[var] = VarInfo(producer=name, qparams_of=(name, "output"))

    def _share(self, eqn, infos, users, ctx: Scope) -> VarInfo | None:
        """Output info of a value-preserving op on a quantized value (a view of its owner), else None."""
        prim = eqn.primitive.name
        source = infos[0].qparams_of if infos else None
        chain = patterns.clamp_chain(eqn)
        if chain is not None:  # a standalone ReLU / ReLU6 / clip (a ReLU after a conv / dense / add is fused)
            prim = "relu" if chain == patterns.RELU else "clamp"
            source = infos[eqn.invars.index(patterns.clamp_input(eqn))].qparams_of
        if source is not None and _fixed(self._slot_spec(source)):
            # Constant qparams (a sigmoid's): value-preserving ops keep them, nothing observes; other ops
            # (a cat, an average) take their own specs.
            keeps = prim in self.quantizer.share_through and prim not in patterns.AVERAGE_SUMS
            return VarInfo(qparams_of=source) if keeps and len(eqn.outvars) == 1 else None
        if prim == "concatenate" and self.quantizer.share_concatenate and source is not None:
            return self._concatenate_view(eqn, infos, source, ctx)
        if prim in patterns.AVERAGE_SUMS:
            divide = patterns.average_divide(eqn, users) if prim in self.quantizer.share_through else None
            if source is None or divide is None:
                return None
            self.average_kind[id(divide)] = patterns.AVERAGE_SUMS[prim]
            return VarInfo(summed_from=source)
        if prim in patterns.KEEPDIMS and infos[0].summed_from is not None:  # keepdims between the sum and the div
            return VarInfo(summed_from=infos[0].summed_from)
        if prim == "div" and infos[0].summed_from is not None and infos[1].constant and id(eqn) in self.average_kind:
            source = infos[0].summed_from
            self._view(eqn, View(source[0], source[1], self._slot_spec(source), self.average_kind[id(eqn)]))
            return VarInfo(qparams_of=source)
        if source is None or prim not in self.quantizer.share_through or len(eqn.outvars) != 1:
            return None
        if patterns.chain_end(eqn, users, self.quantizer.share_through):
            self._view(eqn, View(source[0], source[1], self._slot_spec(source), prim))
        return VarInfo(qparams_of=source)

    def _concatenate_view(self, eqn, infos, source, ctx: Scope) -> VarInfo | None:
        """torch x86: a cat's inputs and output all use the first input's observer (inputs already quantized
        with it are not observed again; a site whose only consumer is this cat gives up its own observer)."""
        if eqn.primitive.name not in self.candidates:
            return None
        candidate, _ = self.candidate(eqn, infos, ctx, peek=True)
        annotation = self.quantizer.annotate(candidate)
        if annotation is None or annotation.output is None:
            return None
        observe = self._join_group(eqn, infos, skip=source)
        self._view(eqn, View(source[0], source[1], self._slot_spec(source), "concatenate", inputs=tuple(observe)))
        return VarInfo(qparams_of=source)

    def _join_group(self, eqn, infos, skip) -> list[int]:
        """Activation operands of a concatenate that join its observer group (their producer site, when this
        cat is that site's only consumer, gives up its own output observer)."""
        observe = []
        for position, (var, info) in enumerate(zip(eqn.invars, infos, strict=True)):
            if isinstance(var, Literal) or not _is_float(var.aval) or info.param_path is not None or info.constant:
                continue
            if skip is not None and info.qparams_of == skip:
                continue
            producer = info.qparams_of[0] if info.qparams_of else None
            if producer is not None and self.output_var.get(producer) is var and self._uses(var) == 1:
                self.dropped.add(producer)
            observe.append(position)
        return observe

    def _view(self, eqn, view: View) -> None:
        self.by_eqn[id(eqn)] = view
        self.keepalive.append(eqn)

    def _uses(self, var) -> int:
        return self.use_counts.get(var, 0)

    def _site(self, name: str) -> Site:
        return next(s for s in reversed(self.sites) if s.name == name)

    def _slot_spec(self, source: tuple[str, str]):
        """The spec of slot ``(site name, role key)``."""
        owner = self._site(source[0])
        return owner.output_spec if source[1] == "output" else owner.operand(source[1]).spec

    def finish(self) -> None:
        """Apply what the graph options decided to the site records (fused tails, dropped outputs)."""
        for i, site in enumerate(self.sites):
            changes = {}
            if site.name in self.fused:
                changes["fused"] = self.fused[site.name]
            if site.name in self.dropped:
                changes["output_spec"] = None
                changes.pop("fused", None)
                self.fused_eqns.pop(site.name, None)
            if not changes:
                continue
            new = dataclasses.replace(site, **changes)
            self.sites[i] = new
            eqn = self.eqn_of[site.name]
            self.by_eqn[id(eqn)] = new
        for key, view in list(self.by_eqn.items()):
            if isinstance(view, View) and view.name in self.dropped and view.key == "output":
                del self.by_eqn[key]

    def walk_higher_order(self, eqn, infos, ctx: Scope):
        rule = rule_for(eqn.primitive)
        if rule is None:
            raise UnsupportedPrimitiveError(
                f"jquant.quantize: primitive {eqn.primitive.name!r} carries a sub-jaxpr that jquant does not know "
                f"how to interpret (known: {', '.join(known_names())}). Move it out of the quantized function, "
                "use config=[] for this function, or add a rule to jquant.transform.higher_order.RULES."
            )
        return rule.discover(self, eqn, infos, ctx.enter(name=clean_name_stack(str(eqn.source_info.name_stack))))

    # -- sites ---------------------------------------------------------------------------------------------
    def candidate(
        self, eqn, infos, ctx: Scope, peek: bool = False, primitive: str | None = None
    ) -> tuple[Candidate, list[int]]:
        """The site candidate of ``eqn`` (taking its name unless ``peek``) and its floating-point positions
        (``primitive``: the site's primitive when a pattern names it, e.g. "softmax" for its last ``div``)."""
        prim = primitive or eqn.primitive.name
        name_stack = ctx.enter(name=clean_name_stack(str(eqn.source_info.name_stack))).prefix
        positions = [i for i, v in enumerate(eqn.invars) if not isinstance(v, Literal) and _is_float(v.aval)]
        if prim == "softmax":  # the div's operands are softmax internals: only its output can be quantized
            positions = []
        roles = tuple("weight" if infos[i].param_path is not None else "input" for i in positions)
        weight_path = next((infos[i].param_path for i in positions if infos[i].param_path is not None), None)
        base = site_base_name(name_stack, weight_path, prim)
        name = self.namer.peek(base) if peek else self.namer(base)
        shapes = tuple(tuple(eqn.invars[i].aval.shape) for i in positions)
        constants = tuple(infos[i].constant for i in positions)
        return Candidate(name, prim, roles, shapes, tuple(infos[i].param_path for i in positions), constants), positions

    def make_site(self, eqn, infos, ctx: Scope, primitive: str | None = None) -> Site:
        prim = primitive or eqn.primitive.name
        candidate, positions = self.candidate(eqn, infos, ctx, primitive=prim)
        site_name, roles = candidate.name, list(candidate.roles)
        rule = self.quantizer.annotate(candidate)
        if prim == "softmax" and rule is not None and (rule.weight is not None or rule.inputs is not None):
            raise ValueError(
                f"site {site_name!r} (softmax): only an output spec applies; its input is read by the max and the "
                "subtraction inside the softmax. Quantize that input at its producer's output instead."
            )
        cat_group = (
            self.quantizer.share_concatenate and prim == "concatenate" and rule is not None
            and _static_per_tensor(rule.output)
        )
        joining = set(self._join_group(eqn, infos, skip=None)) if cat_group else set()
        operands = []
        act_position = 0
        note = ""
        for index, role, key in zip(positions, roles, role_keys(roles, positions), strict=True):
            aval = eqn.invars[index].aval
            if role == "weight":
                spec = rule.weight if rule else None
                out_axes, contract = dataflow.weight_axes(prim, eqn.params, index, len(aval.shape))
                if prim == "gather" and index == 0:  # an embedding table: per row (the indexed axes), like torch
                    out_axes = tuple(sorted(eqn.params["dimension_numbers"].start_index_map))
                k = int(np.prod([aval.shape[a] for a in contract])) if contract else 0
                if (isinstance(spec, QuantizationSpec) and spec.block_size and contract and k % spec.block_size
                        and rule.weight_fallback is not None):
                    note = (f"group size {spec.block_size} does not divide the contraction size {k}: "
                            f"{_short_spec(rule.weight_fallback)} instead")
                    self.fallbacks.append(f"{site_name} ({note})")
                    spec = rule.weight_fallback
            else:
                spec = rule.input_spec(act_position) if rule else None
                act_position += 1
                out_axes, contract = (), ()
                source = infos[index].qparams_of
                if index in joining:  # a cat group owned by this site: observed before the output
                    spec = SharedQuantizationSpec("output")
                elif source is not None and isinstance(spec, QuantizationSpec) and not spec.is_dynamic:
                    # Already quantized by an earlier site: reuse its qparams (no observer of its own); constant
                    # qparams (a sigmoid's output) are simply this operand's too.
                    target = self._slot_spec(source)
                    spec = target if _fixed(target) else SharedQuantizationSpec(source[1], site=source[0], spec=target)
            if isinstance(spec, QuantizationSpec) and spec.ch_axis is not None:
                out_axes = (spec.ch_axis % max(len(aval.shape), 1),)
            operands.append(
                Operand(
                    index=index,
                    role=role,
                    key=key,
                    shape=tuple(aval.shape),
                    dtype=str(aval.dtype),
                    spec=spec,
                    param_path=infos[index].param_path,
                    out_axes=out_axes,
                    contract_axes=contract,
                    producer=infos[index].producer,
                )
            )
        out_aval = eqn.outvars[0].aval
        output_spec = rule.output if rule else None
        if output_spec is not None and not _is_float(out_aval):
            output_spec = None
        site = Site(
            name=site_name,
            primitive=prim,
            operands=tuple(operands),
            output_shape=tuple(out_aval.shape),
            output_dtype=str(out_aval.dtype),
            output_spec=output_spec,
            rule=rule,
            stack=ctx.stack,
            in_while=ctx.in_while,
            note=note,
        )
        self.sites.append(site)
        if site.quantized:
            _validate_site(site, {s.name: s for s in self.sites})
            self.by_eqn[id(eqn)] = site
            self.keepalive.append(eqn)
        return site


def _short_spec(spec: QuantizationSpec) -> str:
    return f"{spec.dtype} {spec.qscheme}" + (f" (groups of {spec.block_size})" if spec.block_size else "")


def _validate_site(site: Site, known: dict[str, Site]) -> None:
    keys = {op.key: op for op in site.operands}
    if isinstance(site.output_spec, SharedQuantizationSpec):
        raise ValueError(f"site {site.name!r}: an output cannot use SharedQuantizationSpec (share between inputs)")
    for op in site.operands:
        spec = op.spec
        where = f"site {site.name!r}, operand {op.key!r} (shape {op.shape})"
        if isinstance(spec, QuantizationSpec):
            if spec.per_channel and op.role == "input" and spec.ch_axis is None and not spec.is_dynamic:
                raise ValueError(f"{where}: a per-channel activation spec needs ch_axis")
            if spec.block_size is not None:
                if op.role != "weight" or not op.contract_axes:
                    raise ValueError(f"{where}: block_size (group size) applies only to dot/conv weights")
                k = int(np.prod([op.shape[a] for a in op.contract_axes]))
                if k % spec.block_size:
                    raise ValueError(f"{where}: block_size={spec.block_size} does not divide the contraction size {k}")
            if spec.fake_quant == "lsq" and spec.per_channel and (spec.block_size or len(op.out_axes) != 1):
                raise ValueError(f"{where}: LSQ supports per-tensor or single-axis per-channel qparams only")
        elif isinstance(spec, SharedQuantizationSpec) and spec.site is not None:
            if spec.site not in known:
                raise ValueError(f"{where}: SharedQuantizationSpec refers to unknown site {spec.site!r}")
        elif isinstance(spec, SharedQuantizationSpec) and spec.target == "output":
            if not _static_per_tensor(site.output_spec):
                raise ValueError(
                    f"{where}: sharing the output's qparams needs a static per-tensor output QuantizationSpec, "
                    f"got {site.output_spec!r}"
                )
        elif isinstance(spec, SharedQuantizationSpec):
            target = keys.get(spec.target)
            if target is None or not isinstance(target.spec, QuantizationSpec) or target is op:
                raise ValueError(
                    f"{where}: SharedQuantizationSpec target {spec.target!r} must be another operand of the same "
                    f"site with a QuantizationSpec; operands: {sorted(keys)}"
                )
            if target.shape != op.shape and target.spec.per_channel:
                raise ValueError(f"{where}: cannot share per-channel qparams with {spec.target!r} of another shape")
        elif isinstance(spec, DerivedQuantizationSpec):
            for ref in spec.derived_from:
                _check_reference(site, op, ref, keys, known, where)


def _check_reference(site, op, ref, keys, known, where) -> None:
    if ref.startswith("producer:"):
        producer = next((o.producer for o in site.operands if o.role == "input" and o.producer), None)
        key = ref.split(":", 1)[1]
        if producer is None or producer not in known:
            raise ValueError(
                f"{where}: DerivedQuantizationSpec refers to {ref!r} but no activation input of this site comes "
                "directly from a quantized site in the same scope"
            )
        if key not in {o.key for o in known[producer].operands}:
            raise ValueError(f"{where}: producer site {producer!r} has no operand {key!r}")
    elif ":" in ref:  # "<site name>:<role>": any earlier site in the same scope
        other, key = ref.rsplit(":", 1)
        if other not in known or key not in {o.key for o in known[other].operands} | {"output"}:
            raise ValueError(
                f"{where}: DerivedQuantizationSpec refers to {ref!r}, but no earlier site {other!r} in this scope "
                f"has a tensor {key!r}"
            )
    elif ref not in keys or ref == op.key:
        raise ValueError(f"{where}: DerivedQuantizationSpec refers to unknown operand {ref!r}; have {sorted(keys)}")


def build_plan(
    closed: ClosedJaxpr, arg_paths: list[str | None], quantizer: Quantizer | tuple[Rule, ...], strict: bool = False
) -> Plan:
    """Discover, name and configure the sites of ``closed``; ``arg_paths`` marks the weight inputs.

    ``quantizer``: a ``Quantizer`` or a tuple of rules (``strict``: a rule matching no site raises)."""
    quantizer = as_quantizer(quantizer, strict)
    discovery = _Discovery(quantizer)
    in_infos = [VarInfo(param_path=p) for p in arg_paths]
    discovery.walk(closed.jaxpr, in_infos, Scope())
    discovery.finish()
    if discovery.fallbacks:
        warnings.warn(
            f"jquant.quantize: {len(discovery.fallbacks)} site(s) use their rule's weight_fallback: "
            + "; ".join(discovery.fallbacks),
            stacklevel=4,
        )
    quantizer.validate(discovery.sites)
    unmatched = quantizer.unmatched(discovery.sites) if isinstance(quantizer, RuleQuantizer) else ()
    fused_eqns = {k: v for k, v in discovery.fused_eqns.items() if k not in discovery.dropped}
    plan = Plan(closed, discovery.sites, discovery.by_eqn, discovery.inner, unmatched, fused_eqns=fused_eqns,
                stacked=discovery.stacked)
    plan._keepalive = discovery.keepalive  # id(eqn) keys stay valid while the plan lives
    return plan
