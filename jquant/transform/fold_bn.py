"""Fold inference BatchNorm into the preceding conv / dense kernel, before discovery (torch FX's conv-bn fusion).

Matched on the traced jaxpr (weights = values computed only from the weights argument and constants):

    y = conv(x, W) | dot(x, W)          W a weight, one output-feature dim
    [y = y + b]                          bias (optional)
    y = y - mean                         mean, and every operand below: per-output-channel weights
    y = y * s | y / d   (one or more)    linen / nnx: * (rsqrt(var + eps) * gamma); plain: * gamma / sqrt(var + eps)
    y = y + beta

becomes ``conv(x, W * A) + B`` with ``A`` the product of the ``s`` and ``1 / d`` (per channel) and ``B`` the chain
applied to ``b`` (or 0), so the folded kernel is what the weight observer sees, as in torch. Every ``rsqrt``
in the weight-only computation of ``A`` is evaluated as ``1 / sqrt`` behind an optimization barrier: torch's
``fuse_conv_bn_weights`` uses ``torch.rsqrt`` (== 1 / sqrt in float32), while XLA's rsqrt is 1 ulp off in about a
quarter of the channels, so the folded kernel equals torch's bit for bit. Each intermediate value of the chain
must have no other consumer. Only the top-level jaxpr is rewritten (not scan / cond bodies).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import source_info_util
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from jquant.transform.interpreter import bind_eqn
from jquant.transform.patterns import use_counts


@dataclasses.dataclass
class _Fold:
    anchor: object  # the conv / dot equation
    weight_index: int
    kernel_axis: int  # output-feature dim of the kernel
    channel_axis: int  # output-feature dim of the result
    steps: list  # (kind, var): "bias", "sub", "mul", "div", "add"
    eqns: list  # the chain's equations after the anchor
    out: object  # the chain's final variable


def _has_sub_jaxpr(eqn) -> bool:
    return any(isinstance(v, ClosedJaxpr | Jaxpr) for v in eqn.params.values())


def _weight_vars(jaxpr: Jaxpr, weight_mask: list[bool]) -> set:
    weights = set(jaxpr.constvars) | {v for v, w in zip(jaxpr.invars, weight_mask, strict=True) if w}
    for eqn in jaxpr.eqns:
        if eqn.effects or _has_sub_jaxpr(eqn):
            continue
        ins = [v for v in eqn.invars if not isinstance(v, Literal)]
        if ins and all(v in weights for v in ins):
            weights.update(eqn.outvars)
    return weights


def _per_channel(shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> bool:
    if len(shape) > len(out_shape):
        return False
    aligned = (1,) * (len(out_shape) - len(shape)) + tuple(shape)
    return all(d == 1 or (i == axis and d == out_shape[axis]) for i, d in enumerate(aligned))


def _anchor(eqn, weights: set):
    """(weight operand index, kernel out-feature axis, result channel axis) of a foldable conv / dot, or None."""
    prim = eqn.primitive.name
    if prim == "conv_general_dilated":
        lhs_spec, rhs_spec, out_spec = eqn.params["dimension_numbers"]
        if eqn.invars[1] in weights and eqn.invars[0] not in weights and eqn.params["feature_group_count"] == 1:
            return 1, rhs_spec[0], out_spec[1]
    elif prim == "dot_general":
        (_, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
        w = eqn.invars[1]
        free = [d for d in range(len(w.aval.shape)) if d not in rhs_contract]
        if w in weights and eqn.invars[0] not in weights and not lhs_batch and len(free) == 1:
            return 1, free[0], len(eqn.outvars[0].aval.shape) - 1
    return None


def _match(jaxpr: Jaxpr, weights: set) -> list[_Fold]:
    uses = use_counts(jaxpr)
    readers: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, Literal):
                readers.setdefault(v, []).append(eqn)
    folds = []
    for eqn in jaxpr.eqns:
        found = _anchor(eqn, weights)
        if found is None:
            continue
        out_shape = tuple(eqn.outvars[0].aval.shape)
        cur, steps, chain = eqn.outvars[0], [], []
        while uses[cur] == 1 and len(readers.get(cur, [])) == 1:
            nxt = readers[cur][0]
            kind = _step(nxt, cur, steps, weights, out_shape, found[2])
            if kind is None:
                break
            steps.append(kind)
            chain.append(nxt)
            cur = nxt.outvars[0]
            if kind[0] == "add":
                break
        kinds = [k for k, _ in steps]
        if steps and kinds[-1] == "add" and "sub" in kinds and any(k in ("mul", "div") for k in kinds):
            folds.append(_Fold(eqn, *found, steps, chain, cur))
    return folds


def _step(eqn, cur, steps, weights, out_shape, axis):
    """The chain step ``eqn`` makes on ``cur`` (kind, other operand), or None."""
    prim = eqn.primitive.name
    if len(eqn.invars) != 2 or tuple(eqn.outvars[0].aval.shape) != out_shape:
        return None
    a, b = eqn.invars
    other = b if a is cur else a if b is cur else None
    if other is None or other is cur or isinstance(other, Literal) or other not in weights:
        return None
    if not _per_channel(tuple(other.aval.shape), out_shape, axis):
        return None
    kinds = [k for k, _ in steps]
    if prim == "add" and not kinds:
        return ("bias", other)
    if prim == "sub" and a is cur and "sub" not in kinds and not any(k in ("mul", "div") for k in kinds):
        return ("sub", other)
    if prim == "mul" and "sub" in kinds:
        return ("mul", other)
    if prim == "div" and a is cur and "sub" in kinds:
        return ("div", other)
    if prim == "add" and any(k in ("mul", "div") for k in kinds):
        return ("add", other)
    return None


def fold_batchnorm(closed: ClosedJaxpr, weight_mask: list[bool]) -> ClosedJaxpr:
    """``closed`` with every conv / dense + inference BatchNorm chain folded (see the module docstring)."""
    jaxpr = closed.jaxpr
    weights = _weight_vars(jaxpr, weight_mask)
    folds = _match(jaxpr, weights)
    if not folds:
        return closed
    by_anchor = {id(f.anchor): f for f in folds}
    skipped = {id(e) for f in folds for e in f.eqns}
    defining = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}

    def run(*args):
        env = dict(zip(jaxpr.constvars, closed.consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))
        exact: dict = {}  # weight-only values with torch's rsqrt (1 / sqrt)

        def read(v):
            if isinstance(v, Literal):
                return v.val
            if v not in env:  # a weight-only value defined further down: evaluate it now
                eqn = defining[v]
                env.update(zip(eqn.outvars, bind_eqn(eqn, [read(x) for x in eqn.invars]), strict=True))
            return env[v]

        def read_exact(v):
            if isinstance(v, Literal) or v not in defining:
                return read(v)
            if v not in exact:
                eqn = defining[v]
                ins = [read_exact(x) for x in eqn.invars]
                if eqn.primitive.name == "rsqrt":
                    outs = [jnp.ones_like(ins[0]) / lax.optimization_barrier(jnp.sqrt(ins[0]))]
                else:
                    outs = bind_eqn(eqn, ins)
                exact.update(zip(eqn.outvars, outs, strict=True))
            return exact[v]

        for eqn in jaxpr.eqns:
            if id(eqn) in skipped or all(v in env for v in eqn.outvars):
                continue
            fold = by_anchor.get(id(eqn))
            if fold is None:
                env.update(zip(eqn.outvars, bind_eqn(eqn, [read(v) for v in eqn.invars]), strict=True))
                continue
            env[fold.out] = _folded(fold, [read(v) for v in eqn.invars], read_exact)
        return [read(v) for v in jaxpr.outvars]

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type) for v in jaxpr.invars]
    with source_info_util.reset_name_stack():
        return jax.make_jaxpr(run)(*avals)


def _folded(fold: _Fold, invals: list, read_exact) -> jax.Array:
    eqn = fold.anchor
    out_shape = tuple(eqn.outvars[0].aval.shape)
    channels = out_shape[fold.channel_axis]
    name_stack = source_info_util.current_name_stack() + eqn.source_info.name_stack
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack):
        def vec(v):
            return jnp.broadcast_to(jnp.ravel(read_exact(v)), (channels,))

        factor = None
        bias = jnp.zeros((channels,), eqn.outvars[0].aval.dtype)
        for kind, v in fold.steps:
            value = vec(v)
            if kind == "bias":
                bias = value
            elif kind == "sub":
                bias = bias - value
            elif kind == "mul":
                factor = value if factor is None else factor * value
                bias = bias * value
            elif kind == "div":
                inverse = jnp.ones_like(value) / lax.optimization_barrier(value)
                factor = inverse if factor is None else factor * inverse
                bias = bias / value
            else:
                bias = bias + value
        w = invals[fold.weight_index]
        shape = [1] * w.ndim
        shape[fold.kernel_axis] = channels
        values = list(invals)
        values[fold.weight_index] = w * factor.reshape(shape)
    y = bind_eqn(eqn, values)[0]
    with source_info_util.user_context(eqn.source_info.traceback, name_stack=name_stack):
        shape = [1] * len(out_shape)
        shape[fold.channel_axis] = channels
        return y + bias.reshape(shape)
