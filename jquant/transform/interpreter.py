"""The jaxpr walker behind ``jquant.quantize``, with a hook to replace the computation at each site.

Hook (used by the quantize transform and by ``jquant.convert``)::

    outs, new_states = interpret(plan, handler, states, *flat_args)

- ``plan``: a ``jquant.transform.plan.Plan`` (``QuantizedFunction.plan(*args)`` builds and caches it): the
  traced ``ClosedJaxpr`` plus the quantized sites, keyed by equation; ``plan.quantized_sites`` lists them
  and ``jax.tree_util.tree_unflatten(plan.out_tree, outs)`` rebuilds the function's output.
- ``flat_args``: the flat leaves of the function's arguments (``jax.tree_util.tree_leaves(args)``), in the
  order the jaxpr takes them. Weights a handler replaces may be passed as placeholders (e.g. zeros of the
  right shape): the layout equations on them (reshape/transpose) become dead code that XLA removes.
- ``states``: ``{site_name: site_state}`` for every quantized site (the qstate, see ``state.py``); a site
  inside a scan has every leaf stacked with the scan's trip count as a leading dim, and the interpreter
  slices / restacks them, so the handler always sees ONE iteration's state.
- ``handler(site, eqn, invals, site_state, scope_states) -> (outvals, new_site_state)`` is called instead of
  binding each quantized site's equation. ``site`` is the ``Site`` record (operands with role, key, spec,
  per-channel axes, parameter path), ``eqn`` the ``JaxprEqn``, ``invals`` the input values (one per
  ``eqn.invars``), ``site_state`` this site's state, ``scope_states`` a read-only view of the states of
  the sites already run in the same scope (for ``DerivedQuantizationSpec`` "producer:" references).
  It returns ``outvals`` (a list, one per ``eqn.outvars``; they are cast back to the outvar dtypes) and
  the site's new state (same pytree structure and dtypes: it may be a loop carry). ``bind_eqn(eqn,
  invals)`` runs the original equation. Optional: ``handler.merge(site, new_state, old_state, axis_names)
  -> site_state``, called inside ``shard_map`` to combine the per-shard states of a site.
- Every other equation is re-bound unchanged, so under ``jit`` the result compiles to the same HLO as the
  hand-written program; higher-order equations without quantized sites inside are re-bound as they are.

Higher-order primitives (jit, scan, cond, while, remat, custom_jvp/vjp, shard_map) follow the rule table
of ``jquant.transform.higher_order``, which also holds their discovery rules. Any other primitive with a
sub-jaxpr raises ``UnsupportedPrimitiveError`` at plan time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp
from jax import lax
from jax.extend import source_info_util
from jax.extend.core import Literal

from jquant.transform.higher_order import rule_for, sub_jaxpr
from jquant.transform.plan import Plan
from jquant.transform.sites import Site

SiteHandler = Callable[[Site, Any, list, Any, Mapping[str, Any]], tuple[list, Any]]


def bind_eqn(eqn, invals: list) -> list:
    """Run one equation as it is (donation switched off: the interpreter never owns the caller's buffers)."""
    params = dict(eqn.params)
    if "donated_invars" in params:
        params["donated_invars"] = (False,) * len(params["donated_invars"])
    bind_params = eqn.primitive.get_bind_params(params)
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack), eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def interpret(plan: Plan, handler: SiteHandler, states: Mapping[str, Any], *args) -> tuple[list, dict]:
    """Evaluate ``plan.closed_jaxpr`` on flat ``args``, calling ``handler`` at each quantized site."""
    closed = plan.closed_jaxpr
    if len(args) != len(closed.jaxpr.invars):
        raise TypeError(f"interpret: the traced function takes {len(closed.jaxpr.invars)} flat inputs, got {len(args)}")
    walker = _Walker(plan, handler)
    return walker.run(closed.jaxpr, closed.consts, list(args), dict(states))


def _cast_like(values: list, outvars: list) -> list:
    cast = []
    for value, var in zip(values, outvars, strict=True):
        dtype = var.aval.dtype
        cast.append(value if jnp.result_type(value) == dtype else lax.convert_element_type(value, dtype))
    return cast


class _Walker:
    def __init__(self, plan: Plan, handler: SiteHandler):
        self.plan = plan
        self.handler = handler

    def run(self, jaxpr, consts, args: list, states: dict) -> tuple[list, dict]:
        env: dict = {}

        def read(var):
            return var.val if isinstance(var, Literal) else env[var]

        for var, value in zip(jaxpr.constvars, consts, strict=True):
            env[var] = value
        for var, value in zip(jaxpr.invars, args, strict=True):
            env[var] = value
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            site = self.plan.by_eqn.get(id(eqn))
            if site is not None:
                outs, states[site.name] = self.handler(
                    site, eqn, invals, states[site.name], MappingProxyType(states)
                )
                outs = _cast_like(list(outs), eqn.outvars)
            elif id(eqn) in self.plan.inner:
                outs, states = self.higher_order(eqn, invals, states)
            else:
                outs = bind_eqn(eqn, invals)
            for var, value in zip(eqn.outvars, outs, strict=True):
                env[var] = value
        return [read(v) for v in jaxpr.outvars], states

    # -- what the higher-order rules call ----------------------------------------------------------------
    def higher_order(self, eqn, invals, states):
        rule = rule_for(eqn.primitive)
        if rule.inline:
            return rule.interpret(self, eqn, invals, states)
        names = self.plan.inner[id(eqn)]
        outs, new_inner = rule.interpret(self, eqn, invals, {n: states[n] for n in names})
        states = dict(states)
        states.update(new_inner)
        return outs, states

    def body(self, closed_or_open) -> Callable[[list, dict], tuple[list, dict]]:
        """``f(args, site_states) -> (outs, site_states)`` running a sub-jaxpr through this interpreter."""
        jaxpr, consts = sub_jaxpr(closed_or_open)

        def run(args, inner):
            return self.run(jaxpr, consts, list(args), dict(inner))

        return run

    @staticmethod
    def bind(eqn, invals: list) -> list:
        return bind_eqn(eqn, invals)

    def merge_shards(self, new_states: dict, old_states: dict, axis_names: tuple) -> dict:
        """Per-shard site states combined across ``axis_names`` by the handler (unchanged without ``merge``)."""
        merge = getattr(self.handler, "merge", None)
        if merge is None:
            return new_states
        sites = self.plan.site_by_name
        return {n: merge(sites[n], state, old_states[n], axis_names) for n, state in new_states.items()}
