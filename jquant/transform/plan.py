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

from jquant.transform import dataflow
from jquant.transform.dataflow import ACTIVATION, VarInfo
from jquant.transform.higher_order import Scope, known_names, rule_for
from jquant.transform.sites import Namer, Operand, Site, clean_name_stack, role_keys, site_base_name
from jquant.transform.specs import (
    DEFAULT_PRIMITIVES,
    DerivedQuantizationSpec,
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
    by_eqn: dict[int, Site]
    inner: dict[int, tuple[str, ...]]
    unmatched_rules: tuple[Rule, ...]
    out_tree: Any = None  # pytree structure of fn's output (set by QuantizedFunction)

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


class _Discovery:
    def __init__(self, rules: tuple[Rule, ...]):
        self.rules = rules
        self.candidates = set(DEFAULT_PRIMITIVES).union(*(r.primitives for r in rules)) if rules else set()
        self.namer = Namer()
        self.sites: list[Site] = []
        self.by_eqn: dict[int, Site] = {}
        self.inner: dict[int, tuple[str, ...]] = {}
        self.used_rules: set[int] = set()
        self.keepalive: list = []  # equations whose id() keys the plan

    # -- walking -------------------------------------------------------------------------------------------
    def walk(self, jaxpr: Jaxpr, in_infos, ctx: Scope):
        """Returns (output infos, names of quantized sites found in this jaxpr, recursively)."""
        env = {v: dataflow.CONSTANT for v in jaxpr.constvars}  # closed-over arrays: constants, not activations
        env.update(zip(jaxpr.invars, in_infos, strict=True))
        names: list[str] = []
        for eqn in jaxpr.eqns:
            infos = [dataflow.read_info(env, v) for v in eqn.invars]
            name = eqn.primitive.name
            out_infos = [ACTIVATION] * len(eqn.outvars)
            if name in self.candidates:
                site = self.make_site(eqn, infos, ctx)
                if site.quantized:
                    names.append(site.name)
                    out_infos = [VarInfo(producer=site.name)] * len(eqn.outvars)
            elif self.rules and _sub_jaxprs(eqn.params):  # config=[]: nothing to look for
                out_infos, inner = self.walk_higher_order(eqn, infos, ctx)
                if inner:
                    self.inner[id(eqn)] = tuple(inner)
                    self.keepalive.append(eqn)
                    names.extend(inner)
            else:
                passed = dataflow.passthrough_info(name, infos) or dataflow.derived_weight_info(name, infos)
                if passed is not None:
                    out_infos = [passed] * len(eqn.outvars)
            env.update(zip(eqn.outvars, out_infos, strict=True))
        return [dataflow.read_info(env, v) for v in jaxpr.outvars], names

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
    def match(self, site_name: str, primitive: str) -> Rule | None:
        for i, rule in enumerate(self.rules):
            if rule.matches(site_name, primitive):
                self.used_rules.add(i)
                return rule
        return None

    def make_site(self, eqn, infos, ctx: Scope) -> Site:
        prim = eqn.primitive.name
        name_stack = ctx.enter(name=clean_name_stack(str(eqn.source_info.name_stack))).prefix
        positions = [i for i, v in enumerate(eqn.invars) if not isinstance(v, Literal) and _is_float(v.aval)]
        roles = ["weight" if infos[i].param_path is not None else "input" for i in positions]
        weight_path = next((infos[i].param_path for i in positions if infos[i].param_path is not None), None)
        site_name = self.namer(site_base_name(name_stack, weight_path, prim))
        rule = self.match(site_name, prim)
        operands = []
        act_position = 0
        for index, role, key in zip(positions, roles, role_keys(roles, positions), strict=True):
            aval = eqn.invars[index].aval
            if role == "weight":
                spec = rule.weight if rule else None
                out_axes, contract = dataflow.weight_axes(prim, eqn.params, index, len(aval.shape))
            else:
                spec = rule.input_spec(act_position) if rule else None
                act_position += 1
                out_axes, contract = (), ()
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
        )
        self.sites.append(site)
        if site.quantized:
            _validate_site(site, {s.name: s for s in self.sites})
            self.by_eqn[id(eqn)] = site
            self.keepalive.append(eqn)
        return site


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
    elif ref not in keys or ref == op.key:
        raise ValueError(f"{where}: DerivedQuantizationSpec refers to unknown operand {ref!r}; have {sorted(keys)}")


def build_plan(closed: ClosedJaxpr, arg_paths: list[str | None], rules: tuple[Rule, ...], strict: bool) -> Plan:
    """Discover, name and configure the sites of ``closed``; ``arg_paths`` marks the weight inputs."""
    discovery = _Discovery(rules)
    in_infos = [VarInfo(param_path=p) for p in arg_paths]
    discovery.walk(closed.jaxpr, in_infos, Scope())
    unmatched = tuple(r for i, r in enumerate(rules) if i not in discovery.used_rules)
    if unmatched:
        names = [s.name for s in discovery.sites]
        message = (
            f"jquant.quantize: {len(unmatched)} rule(s) matched no site: "
            f"{', '.join(r.describe() for r in unmatched)}. Sites: {names}"
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=4)
    plan = Plan(closed, discovery.sites, discovery.by_eqn, discovery.inner, unmatched)
    plan._keepalive = discovery.keepalive  # id(eqn) keys stay valid while the plan lives
    return plan

