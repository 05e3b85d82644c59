"""One rule per higher-order primitive: how discovery walks into it and how the interpreter runs it.

Extension API. A ``HigherOrderRule`` holds both halves for one primitive, so adding support for a new
higher-order primitive is one table entry:

- ``discover(walker, eqn, infos, ctx) -> (out_infos, inner_site_names)``: ``walker.walk(jaxpr, infos, ctx)``
  walks a sub-jaxpr (``ctx`` is the ``Scope`` of the equation: name prefix, scan stack, in-while flag).
- ``interpret(walker, eqn, invals, inner_states) -> (outvals, new_inner_states)``: ``walker.body(jaxpr)``
  returns ``f(args, states) -> (outs, states)`` running a sub-jaxpr through the interpreter; site states of
  the sites inside travel as ``inner_states`` (stacked per iteration for scans, carried for while loops).
- ``inline``: the sub-jaxpr runs in the enclosing scope (``jit``): discovery and interpretation simply
  recurse, and producers / derived-spec references carry over.

Semantics: ``scan`` site states are scan xs / ys (per-iteration statistics, e.g. one per stacked layer);
``cond`` interprets every branch, each receiving all branches' states; ``while`` carries the states (statistics
merged over iterations; the loop predicate is never quantized); ``remat`` keeps its policy;
``custom_jvp_call`` / ``custom_vjp_call`` quantize the body and differentiate with the function's own rule
at the float inputs (straight-through); ``shard_map`` states enter replicated and leave merged across
shards by each observer's ``merge`` (see ``QuantizeHandler.merge``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core.primitives as prims
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr

from jquant.transform import compat, dataflow
from jquant.transform.dataflow import ACTIVATION


@dataclasses.dataclass(frozen=True)
class Scope:
    """Where discovery is: site-name prefix, enclosing scan trip counts, inside a while loop or not."""

    prefix: str = ""
    stack: tuple[int, ...] = ()
    in_while: bool = False

    def enter(self, name: str = "", length: int | None = None, in_while: bool = False) -> Scope:
        prefix = "/".join(p for p in (self.prefix, name) if p)
        stack = self.stack if length is None else (*self.stack, length)
        return Scope(prefix, stack, self.in_while or in_while)


@dataclasses.dataclass(frozen=True)
class HigherOrderRule:
    """Discovery and interpretation of one higher-order primitive (see module docstring)."""

    discover: Callable[..., tuple[list, list[str]]]
    interpret: Callable[..., tuple[list, dict]] | None = None
    inline: bool = False


def sub_jaxpr(closed_or_open: Any) -> tuple[Jaxpr, list]:
    """``(jaxpr, consts)`` of a ``ClosedJaxpr`` or an open ``Jaxpr``."""
    if isinstance(closed_or_open, ClosedJaxpr):
        return closed_or_open.jaxpr, list(closed_or_open.consts)
    return closed_or_open, []


def zero_tangents(tree: Any) -> Any:
    """Zero tangents / cotangents for ``tree``: zeros for float leaves, ``float0`` for integer leaves."""

    def zero(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros_like(x)
        return np.zeros(x.shape, jax.dtypes.float0)

    return jax.tree_util.tree_map(zero, tree)


# -- jit: inlined ---------------------------------------------------------------------------------------------


def _jit_jaxpr(eqn) -> Any:
    return eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))


def _discover_jit(walker, eqn, infos, ctx: Scope):
    return walker.walk(sub_jaxpr(_jit_jaxpr(eqn))[0], infos, ctx)


def _interpret_jit(walker, eqn, invals, states):
    jaxpr, consts = sub_jaxpr(_jit_jaxpr(eqn))
    return walker.run(jaxpr, consts, invals, states)


# -- scoped bodies: remat, custom derivatives, shard_map ------------------------------------------------------


def _discover_scoped(key: str):
    def discover(walker, eqn, infos, ctx: Scope):
        scoped = [dataflow.entering_scope(i) for i in infos]
        outs, inner = walker.walk(sub_jaxpr(eqn.params[key])[0], scoped, ctx)
        return [dataflow.entering_scope(o) for o in outs], inner

    return discover


def _interpret_remat(walker, eqn, invals, inner):
    p = eqn.params
    fn = jax.checkpoint(walker.body(p["jaxpr"]), prevent_cse=p["prevent_cse"], policy=p["policy"])
    return fn(invals, inner)


def _interpret_custom_jvp(walker, eqn, invals, inner):
    body = walker.body(eqn.params["call_jaxpr"])

    @jax.custom_jvp
    def quantized(args, states):
        return body(args, states)

    @quantized.defjvp
    def jvp(primals, tangents):
        args, states = primals
        arg_tangents, _ = tangents
        outs, new_states = quantized(args, states)
        # The function's own derivative rule, evaluated at the float inputs (straight-through).
        _, out_tangents = jax.jvp(lambda *a: walker.bind(eqn, list(a)), tuple(args), tuple(arg_tangents))
        return (outs, new_states), (list(out_tangents), zero_tangents(new_states))

    return quantized(list(invals), inner)


def _interpret_custom_vjp(walker, eqn, invals, inner):
    body = walker.body(eqn.params["call_jaxpr"])

    @jax.custom_vjp
    def quantized(args, states):
        return body(args, states)

    def fwd(args, states):
        return quantized(args, states), (args, states)

    def bwd(residuals, cotangents):
        args, states = residuals
        out_cts, _ = cotangents
        _, vjp = jax.vjp(lambda *a: walker.bind(eqn, list(a)), *args)
        return list(vjp(list(out_cts))), zero_tangents(states)

    quantized.defvjp(fwd, bwd)
    return quantized(list(invals), inner)


def _interpret_shard_map(walker, eqn, invals, inner):
    """States enter replicated; each shard observes its block; states leave merged by the observers' ``merge``.

    Within the call itself fake quant uses each shard's own qparams (calibrate first, or use eval mode, for
    exactly the global qparams).
    """
    from jax.sharding import PartitionSpec

    p = eqn.params
    manual = p.get("newly_manual_axes") or p.get("manual_axes") or p["mesh"].axis_names
    axes = tuple(a for a in p["mesh"].axis_names if a in set(manual))
    body = walker.body(p["jaxpr"])
    replicated = jax.tree_util.tree_map(lambda _: PartitionSpec(), inner)

    def run(args, states):
        outs, new_states = body(args, states)
        return outs, walker.merge_shards(new_states, states, axes)

    fn = jax.shard_map(
        run,
        mesh=p["mesh"],
        in_specs=(list(p["in_specs"]), replicated),
        out_specs=(list(p["out_specs"]), replicated),
        check_vma=False,
        axis_names=set(axes),
    )
    return fn(list(invals), inner)


# -- loops and branches -----------------------------------------------------------------------------------


def _discover_scan(walker, eqn, infos, ctx: Scope):
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    scoped = [dataflow.entering_scope(i) for i in infos]
    body_infos = scoped[:n_consts] + [ACTIVATION] * n_carry + scoped[n_consts + n_carry :]
    for info in scoped[n_consts + n_carry :]:  # weights sliced per iteration (stacked layers)
        if info.param_path is not None:
            walker.stacked[info.param_path] = max(walker.stacked.get(info.param_path, 0), len(ctx.stack) + 1)
    _, inner = walker.walk(p["jaxpr"].jaxpr, body_infos, ctx.enter(length=p["length"]))
    return [ACTIVATION] * len(eqn.outvars), inner


def _interpret_scan(walker, eqn, invals, inner):
    p = eqn.params
    n_consts, n_carry = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
    body = walker.body(p["jaxpr"])

    def step(carry, x):
        xs_i, inner_i = x
        outs, new_inner = body([*consts, *carry, *xs_i], inner_i)
        return outs[:n_carry], (outs[n_carry:], new_inner)

    carry, (ys, new_inner) = lax.scan(
        step, list(init), (list(xs), inner), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )
    return [*carry, *ys], new_inner


def _discover_cond(walker, eqn, infos, ctx: Scope):
    scoped = [dataflow.entering_scope(i) for i in infos]
    inner: list[str] = []
    for branch in eqn.params["branches"]:
        _, found = walker.walk(branch.jaxpr, scoped[1:], ctx)
        inner.extend(found)
    return [ACTIVATION] * len(eqn.outvars), inner


def _interpret_cond(walker, eqn, invals, inner):
    index, operands = invals[0], invals[1:]
    branches = [walker.body(b) for b in eqn.params["branches"]]
    return lax.switch(index, branches, list(operands), inner)


def _discover_while(walker, eqn, infos, ctx: Scope):
    p = eqn.params
    n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
    scoped = [dataflow.entering_scope(i) for i in infos]
    body_infos = scoped[n_cond : n_cond + n_body] + [ACTIVATION] * (len(infos) - n_cond - n_body)
    # The loop condition only yields a predicate: it is never quantized.
    _, inner = walker.walk(p["body_jaxpr"].jaxpr, body_infos, ctx.enter(in_while=True))
    return [ACTIVATION] * len(eqn.outvars), inner


def _interpret_while(walker, eqn, invals, inner):
    p = eqn.params
    n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts, init = invals[:n_cond], invals[n_cond : n_cond + n_body], invals[n_cond + n_body :]
    cond_jaxpr, body = p["cond_jaxpr"], walker.body(p["body_jaxpr"])

    def cond_fn(val):
        carry, _ = val
        return jax.core.eval_jaxpr(cond_jaxpr.jaxpr, cond_jaxpr.consts, *cond_consts, *carry)[0]

    def body_fn(val):
        carry, states = val
        return body([*body_consts, *carry], states)

    return lax.while_loop(cond_fn, body_fn, (list(init), inner))


_JIT = HigherOrderRule(_discover_jit, _interpret_jit, inline=True)

RULES: dict[Any, HigherOrderRule] = {
    prims.jit_p: _JIT,
    prims.closed_call_p: _JIT,
    prims.call_p: _JIT,
    prims.remat_p: HigherOrderRule(_discover_scoped("jaxpr"), _interpret_remat),
    prims.custom_jvp_call_p: HigherOrderRule(_discover_scoped("call_jaxpr"), _interpret_custom_jvp),
    prims.custom_vjp_call_p: HigherOrderRule(_discover_scoped("call_jaxpr"), _interpret_custom_vjp),
    prims.scan_p: HigherOrderRule(_discover_scan, _interpret_scan),
    prims.cond_p: HigherOrderRule(_discover_cond, _interpret_cond),
    prims.while_p: HigherOrderRule(_discover_while, _interpret_while),
}
_SHARD_MAP = compat.shard_map_primitive()
if _SHARD_MAP is not None:
    RULES[_SHARD_MAP] = HigherOrderRule(_discover_scoped("jaxpr"), _interpret_shard_map)


def rule_for(primitive: Any) -> HigherOrderRule | None:
    """The rule of ``primitive`` (a primitive object), or None when jquant does not know it."""
    return RULES.get(primitive)


def known_names() -> list[str]:
    return sorted({p.name for p in RULES})
