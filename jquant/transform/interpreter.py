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
  invals)`` runs the original equation. Optional: ``handler.refresh(site, site_state) -> site_state``,
  called after per-shard states are merged at a ``shard_map`` boundary.
- Every other equation is re-bound unchanged, so under ``jit`` the result compiles to the same HLO as the
  hand-written program; higher-order equations without quantized sites inside are re-bound as they are.

Higher-order primitives: ``jit``/``pjit`` (inlined), ``scan`` (site states are scan xs/ys: per-iteration
statistics, e.g. one per stacked layer), ``cond`` (every branch is interpreted and receives every branch's
site states), ``while`` (site states are loop carries: statistics merged over iterations, since the trip
count is unknown; the loop predicate is never quantized), ``checkpoint``/remat (policy kept),
``custom_jvp_call``/``custom_vjp_call`` (the body is quantized; derivatives use the function's own
custom rule evaluated at the float inputs) and ``shard_map`` (site states enter and leave replicated; see
``_shard_map``). Any other primitive with a sub-jaxpr raises ``UnsupportedPrimitiveError`` at plan time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import source_info_util
from jax.extend.core import Literal

from jquant.transform.plan import JIT_PRIMITIVES, Plan
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


def _zero_tangents(tree):
    def zero(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)

    return jax.tree_util.tree_map(zero, tree)


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

    # -- higher-order equations with quantized sites inside ------------------------------------------------
    def higher_order(self, eqn, invals, states):
        name = eqn.primitive.name
        names = self.plan.inner[id(eqn)]
        if name in JIT_PRIMITIVES:
            closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            return self.run(closed.jaxpr, closed.consts, invals, states)
        inner = {n: states[n] for n in names}
        rule = getattr(self, "_" + name.replace("remat2", "checkpoint"))
        outs, new_inner = rule(eqn, invals, inner)
        states = dict(states)
        states.update(new_inner)
        return outs, states

    def _body(self, closed_or_open):
        jaxpr = getattr(closed_or_open, "jaxpr", closed_or_open)
        consts = list(getattr(closed_or_open, "consts", []))

        def body(args, inner):
            return self.run(jaxpr, consts, list(args), dict(inner))

        return body

    def _scan(self, eqn, invals, inner):
        p = eqn.params
        n_consts, n_carry = p["num_consts"], p["num_carry"]
        consts, init, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
        body = self._body(p["jaxpr"])

        def step(carry, x):
            xs_i, inner_i = x
            outs, new_inner = body([*consts, *carry, *xs_i], inner_i)
            return outs[:n_carry], (outs[n_carry:], new_inner)

        carry, (ys, new_inner) = lax.scan(
            step, list(init), (list(xs), inner), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
        )
        return [*carry, *ys], new_inner

    def _cond(self, eqn, invals, inner):
        index, operands = invals[0], invals[1:]
        branches = [self._body(b) for b in eqn.params["branches"]]
        return lax.switch(index, branches, list(operands), inner)

    def _while(self, eqn, invals, inner):
        p = eqn.params
        n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
        cond_consts, body_consts, init = invals[:n_cond], invals[n_cond : n_cond + n_body], invals[n_cond + n_body :]
        cond_jaxpr, body = p["cond_jaxpr"], self._body(p["body_jaxpr"])

        def cond_fn(val):
            carry, _ = val
            return jax.core.eval_jaxpr(cond_jaxpr.jaxpr, cond_jaxpr.consts, *cond_consts, *carry)[0]

        def body_fn(val):
            carry, states = val
            return body([*body_consts, *carry], states)

        return lax.while_loop(cond_fn, body_fn, (list(init), inner))

    def _checkpoint(self, eqn, invals, inner):
        p = eqn.params
        fn = jax.checkpoint(self._body(p["jaxpr"]), prevent_cse=p["prevent_cse"], policy=p["policy"])
        return fn(invals, inner)

    def _custom_jvp_call(self, eqn, invals, inner):
        body = self._body(eqn.params["call_jaxpr"])

        @jax.custom_jvp
        def quantized(args, states):
            return body(args, states)

        @quantized.defjvp
        def jvp(primals, tangents):
            args, states = primals
            arg_tangents, _ = tangents
            outs, new_states = quantized(args, states)
            # The function's own derivative rule, evaluated at the float inputs (straight-through).
            _, out_tangents = jax.jvp(lambda *a: bind_eqn(eqn, list(a)), tuple(args), tuple(arg_tangents))
            return (outs, new_states), (list(out_tangents), _zero_tangents(new_states))

        return quantized(list(invals), inner)

    def _custom_vjp_call(self, eqn, invals, inner):
        body = self._body(eqn.params["call_jaxpr"])

        @jax.custom_vjp
        def quantized(args, states):
            return body(args, states)

        def fwd(args, states):
            return quantized(args, states), (args, states)

        def bwd(residuals, cotangents):
            args, states = residuals
            out_cts, _ = cotangents
            _, vjp = jax.vjp(lambda *a: bind_eqn(eqn, list(a)), *args)
            return list(vjp(list(out_cts))), _zero_tangents(states)

        quantized.defvjp(fwd, bwd)
        return quantized(list(invals), inner)

    def _shard_map(self, eqn, invals, inner):
        """Site states enter replicated; updated states leave replicated after a cross-shard merge.

        Each shard observes its own block; leaves named ``min_val`` / ``max_val`` (the min/max observers) are
        merged with ``pmin`` / ``pmax`` over the manual axes, which gives the global statistics; other leaves
        take shard 0's value, then ``handler.refresh(site, state)`` (when the handler has one) recomputes
        derived values such as qparams from the merged statistics. Within the call itself, fake quant uses
        each shard's own qparams (calibrate first, or use eval mode, for exact global qparams).
        """
        from jax.sharding import PartitionSpec

        p = eqn.params
        manual = p.get("newly_manual_axes") or p.get("manual_axes") or p["mesh"].axis_names
        axes = tuple(a for a in p["mesh"].axis_names if a in set(manual))
        body = self._body(p["jaxpr"])
        replicated = jax.tree_util.tree_map(lambda _: PartitionSpec(), inner)

        def run(args, states):
            outs, new_states = body(args, states)
            return outs, _merge_across(new_states, states, axes)

        fn = jax.shard_map(
            run,
            mesh=p["mesh"],
            in_specs=(list(p["in_specs"]), replicated),
            out_specs=(list(p["out_specs"]), replicated),
            check_vma=False,
            axis_names=set(axes),
        )
        outs, new_inner = fn(list(invals), inner)
        refresh = getattr(self.handler, "refresh", None)
        if refresh is not None:
            sites = {s.name: s for s in self.plan.sites}
            new_inner = {name: refresh(sites[name], state) for name, state in new_inner.items()}
        return outs, new_inner


def _merge_across(new_states, old_states, axes):
    def merge(path, new, old):
        keys = [getattr(k, "name", getattr(k, "key", "")) for k in path]
        if "min_val" in keys:
            return lax.pmin(new, axes)
        if "max_val" in keys:
            return lax.pmax(new, axes)
        return new

    return jax.tree_util.tree_map_with_path(merge, new_states, old_states)
