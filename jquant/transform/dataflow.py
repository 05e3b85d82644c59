"""Weight vs activation, decided by data flow from the weights argument (never by shape).

Every jaxpr variable gets a ``VarInfo``: the parameter path it comes from (``None`` for activations) and
the site that produced it. A value stays a weight through layout-only and precision-only equations
(reshape, transpose, convert_element_type, broadcast_in_dim, slice, dynamic_slice, squeeze, expand_dims,
rev, copy, sharding constraints) and across jit boundaries, scan xs and consts, cond operands, while
consts, remat and custom_jvp / custom_vjp calls. Elementwise arithmetic whose operands are all weights or
constants also gives a weight (a "derived weight"): BatchNorm folded into a conv kernel
(``kernel * gamma / sqrt(var + eps)``), ``w * mask``, ``w * 2``. Anything mixing in an activation (a gather
``embedding[tokens]``, ``w * x``, a loop carry) makes it an activation.
"""

from __future__ import annotations

import dataclasses

from jax.extend.core import Literal

# Equations whose first operand's weight-ness carries to the output.
PASSTHROUGH = frozenset(
    {
        "reshape",
        "transpose",
        "convert_element_type",
        "broadcast_in_dim",
        "slice",
        "dynamic_slice",
        "squeeze",
        "expand_dims",
        "rev",
        "copy",
        "copy_p",
        "reduce_precision",
        "sharding_constraint",
        "device_put",
        "mesh_cast",
        "reshard",
        "pvary",
    }
)


# Reductions whose output is a constant when their operands are (the window counts of an average pool).
REDUCTIONS = frozenset({"reduce_sum", "reduce_window_sum", "reduce_max", "reduce_min"})

# Elementwise primitives through which a value computed only from weights (and constants) stays a weight.
ELEMENTWISE = frozenset(
    {
        "add", "add_any", "sub", "mul", "div", "neg", "max", "min", "abs", "sign", "sqrt", "rsqrt", "exp", "log",
        "square", "integer_pow", "pow", "tanh", "logistic", "select_n", "clamp", "round", "floor", "ceil",
    }
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class VarInfo:
    """What the discovery pass knows about one jaxpr variable."""

    param_path: str | None = None
    producer: str | None = None
    constant: bool = False
    # (site name, role key) of the slot whose qparams this value is already quantized with (implicit sharing;
    # only set when the quantizer shares qparams between equations).
    qparams_of: tuple[str, str] | None = None
    # The same slot for the sum of such a value (a reduce_window_sum / reduce_sum whose only consumer divides it
    # by a constant: an average pool or mean, which torch runs with its input's qparams).
    summed_from: tuple[str, str] | None = None


ACTIVATION = VarInfo()
CONSTANT = VarInfo(constant=True)


def read_info(env: dict, var) -> VarInfo:
    if isinstance(var, Literal):
        return CONSTANT
    return env.get(var, ACTIVATION)


def passthrough_info(primitive: str, infos: list[VarInfo]) -> VarInfo | None:
    """The output info of a layout-only equation, or None when the primitive is not one."""
    if primitive in PASSTHROUGH and infos and infos[0].param_path is not None:
        return VarInfo(param_path=infos[0].param_path)
    return None


def derived_weight_info(primitive: str, infos: list[VarInfo]) -> VarInfo | None:
    """The output info of elementwise arithmetic on weights and constants only (else None); layout and
    elementwise equations on constants only give constants (``jnp.ones_like(w)``, ``jnp.zeros(n)``)."""
    if primitive not in ELEMENTWISE and primitive not in PASSTHROUGH and primitive not in REDUCTIONS:
        return None
    if infos and all(i.constant for i in infos):
        return CONSTANT
    if primitive not in ELEMENTWISE:
        return None
    paths = [i.param_path for i in infos if i.param_path is not None]
    if paths and all(i.param_path is not None or i.constant for i in infos):
        return VarInfo(param_path=paths[0])
    return None


def barrier_infos(infos: list[VarInfo]) -> list[VarInfo]:
    """``optimization_barrier`` passes each operand through: weights stay weights, constants constants."""
    return [VarInfo(param_path=i.param_path, constant=i.constant) for i in infos]


def entering_scope(info: VarInfo) -> VarInfo:
    """Info of a value seen inside a sub-jaxpr with its own qstate scope (producers do not cross scopes)."""
    return VarInfo(param_path=info.param_path, constant=info.constant)


def weight_axes(primitive: str, params: dict, index: int, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(output-feature axes, contraction axes) of operand ``index`` of a dot_general / conv equation.

    dot_general: every dim that is not contracted (batch dims too: one scale per batch slice).
    conv: the kernel's output-feature dim from ``dimension_numbers``.
    Other primitives: the last axis (e.g. a bias) and no contraction.
    """
    if primitive == "dot_general":
        (lhs_contract, rhs_contract), _ = params["dimension_numbers"]
        contract = tuple(lhs_contract if index == 0 else rhs_contract)
        out = tuple(d for d in range(ndim) if d not in contract)
        return out, contract
    if primitive == "conv_general_dilated":
        lhs_spec, rhs_spec, _ = params["dimension_numbers"]
        spec = rhs_spec if index == 1 else lhs_spec
        return (spec[0],), tuple(spec[1:])
    return ((ndim - 1,) if ndim else ()), ()
