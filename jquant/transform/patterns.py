"""Multi-equation patterns, matched during discovery as torch FX fuses modules before it observes them.

Vocabulary: the *anchor* is a site's own equation (dot_general, conv_general_dilated, add); the *tail* is the
last equation of its pattern, whose output the site's output spec observes. Patterns (torch x86 fusions):

- dot / conv -> bias add -> ReLU          LinearReLU / ConvReLU2d (bias and ReLU optional)
- add -> ReLU                             add_relu
- conv / dot -> BatchNorm (inference)     folded into the kernel before discovery (``fold_bn.py``)
- reduce_window_sum / reduce_sum -> div   avg_pool2d / mean (a constant divisor: the window size or the
                                          per-position counts); shares its input's qparams where the
                                          quantizer shares through the sum primitive

An equation joins a pattern only when it is the single consumer of the current tail's output; a bias add
is an ``add`` whose other operand holds weights or constants only. ReLU is ``jax.nn.relu`` (a custom_jvp
call around ``max(x, 0)``) or ``max(x, 0)`` / ``max(0, x)`` written directly.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from jquant.transform.dataflow import VarInfo

# Anchors that take a bias add (torch Linear / Conv modules own their bias).
BIASED = frozenset({"dot_general", "conv_general_dilated"})
# Anchors whose output may be followed by a fused ReLU.
ANCHORS = BIASED | {"add"}
# Layout-only primitives: a chain of them is one torch op (``flatten`` == transpose + reshape in NHWC code).
LAYOUT = frozenset({"reshape", "transpose", "squeeze", "expand_dims"})


# Equations between a reduction and its division when the reduction keeps its dims.
KEEPDIMS = frozenset({"broadcast_in_dim", "reshape", "expand_dims"})

# Sums that, divided by a constant, are torch's average pool (``reduce_window_sum``) or mean (``reduce_sum``).
AVERAGE_SUMS = {"reduce_window_sum": "avg_pool", "reduce_sum": "mean"}


def use_counts(jaxpr: Jaxpr) -> Counter:
    """How often each variable is read (by equations or as an output of ``jaxpr``)."""
    counts: Counter = Counter()
    for eqn in jaxpr.eqns:
        counts.update(v for v in eqn.invars if not isinstance(v, Literal))
    counts.update(v for v in jaxpr.outvars if not isinstance(v, Literal))
    return counts


def consumers(jaxpr: Jaxpr) -> dict:
    """``{var: [eqn, ...]}``: the equations reading each variable."""
    found: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, Literal):
                found.setdefault(v, []).append(eqn)
    return found


# The clamp chain of a ReLU (see ``clamp_chain``).
RELU = (("max", 0.0),)


def is_relu(eqn) -> bool:
    """``max(x, 0)`` in any spelling: ``lax.max`` with a zero literal, or a call (jax.nn.relu's custom_jvp,
    a jit) whose body is only that."""
    return clamp_chain(eqn) == RELU


def relu_input(eqn):
    """The activation operand of a ReLU equation."""
    return clamp_input(eqn)


def is_bias_add(eqn, var, infos: list[VarInfo]) -> bool:
    """``var + b`` where ``b`` holds weights / constants only (a Linear or Conv bias)."""
    if eqn.primitive.name != "add" or len(eqn.invars) != 2:
        return False
    positions = [i for i, v in enumerate(eqn.invars) if v is var]
    if len(positions) != 1:
        return False
    other = infos[1 - positions[0]]
    return other.param_path is not None or other.constant


class OpenPattern:
    """A site whose pattern may still grow: its current tail equation and the primitives fused so far."""

    def __init__(self, site_name: str, anchor_primitive: str, anchor_eqn):
        self.site_name = site_name
        self.anchor_primitive = anchor_primitive
        self.tail = anchor_eqn
        self.fused: list[str] = []
        self.eqns: list = []  # the absorbed equations, in order (the tail last)

    def extend(self, eqn, infos: list[VarInfo], var, uses: Counter) -> bool:
        """Absorb ``eqn`` (which reads ``var``, this pattern's tail output) if it continues the pattern."""
        if uses[var] != 1 or "relu" in self.fused:
            return False
        if is_relu(eqn) and relu_input(eqn) is var:
            self.fused.append("relu")
        elif self.anchor_primitive in BIASED and not self.fused and is_bias_add(eqn, var, infos):
            self.fused.append("add")
        else:
            return False
        self.tail = eqn
        self.eqns.append(eqn)
        return True


def chain_end(eqn, by_var_consumers: dict, share_through: frozenset[str]) -> bool:
    """False when ``eqn`` is a layout op whose only consumer is another shared layout op (one torch op:
    the observer sees the chain's output once)."""
    if eqn.primitive.name not in LAYOUT:
        return True
    users = by_var_consumers.get(eqn.outvars[0], [])
    return not (len(users) == 1 and users[0].primitive.name in LAYOUT and users[0].primitive.name in share_through)


def average_divide(eqn, by_var_consumers: dict):
    """The ``div`` that makes the sum ``eqn`` an average pool / mean (its only consumer, dividing it), or None.

    A mean that is subtracted from the value it averages (``x - mean(x)``: LayerNorm, variance) is a
    normalization's statistic, not a pooled activation: torch never quantizes it, so it is not matched."""
    if eqn.primitive.name not in AVERAGE_SUMS or len(eqn.outvars) != 1:
        return None
    var = eqn.outvars[0]
    users = by_var_consumers.get(var, [])
    while len(users) == 1 and _keeps_dims(users[0]):  # jnp.mean(keepdims=True): sum -> broadcast -> div
        var = users[0].outvars[0]
        users = by_var_consumers.get(var, [])
    if len(users) != 1 or users[0].primitive.name != "div" or users[0].invars[0] is not var:
        return None
    frontier, seen = [users[0].outvars[0]], set()
    while frontier:  # the mean's readers, through broadcasts / reshapes (keepdims)
        var = frontier.pop()
        for reader in by_var_consumers.get(var, []):
            if eqn.invars[0] in reader.invars:
                return None
            if reader.primitive.name in _BROADCASTS and id(reader) not in seen:
                seen.add(id(reader))
                frontier.append(reader.outvars[0])
    return users[0]


# Equations a softmax's max / sum pass through on their way back to the input's shape.
_BROADCASTS = frozenset({"broadcast_in_dim", "reshape", "expand_dims", "stop_gradient"})


def _through(var, producers: dict, skip: frozenset):
    """The equation producing ``var``, looking through ``skip`` primitives (and ``max(-inf, m)``)."""
    while True:
        eqn = producers.get(var)
        if eqn is None:
            return None
        name = eqn.primitive.name
        if name in skip:
            var = eqn.invars[0]
        elif name == "max" and len(eqn.invars) == 2 and isinstance(eqn.invars[0], Literal):
            var = eqn.invars[1]  # jax.nn.softmax guards an all -inf row: max(-inf, reduce_max(x))
        else:
            return eqn


def softmax_input(eqn, producers: dict):
    """The input ``x`` when ``eqn`` is the ``div`` ending a softmax ``exp(x - max(x)) / sum(exp(x - max(x)))``
    (``jax.nn.softmax`` as it traces), else None. ``producers``: ``{var: eqn}`` of the enclosing jaxpr."""
    if eqn.primitive.name != "div" or any(isinstance(v, Literal) for v in eqn.invars):
        return None
    numerator, denominator = eqn.invars
    exp = producers.get(numerator)
    total = _through(denominator, producers, _BROADCASTS)
    if exp is None or exp.primitive.name != "exp" or total is None or total.primitive.name != "reduce_sum":
        return None
    if total.invars[0] is not numerator:
        return None
    shifted = producers.get(exp.invars[0])
    if shifted is None or shifted.primitive.name != "sub" or isinstance(shifted.invars[1], Literal):
        return None
    x = shifted.invars[0]
    peak = _through(shifted.invars[1], producers, _BROADCASTS)
    if peak is None or peak.primitive.name != "reduce_max" or peak.invars[0] is not x:
        return None
    return x


def _keeps_dims(eqn) -> bool:
    """A reshape-like equation (size-1 dims added or removed, same elements): ``keepdims`` of a reduction."""
    if eqn.primitive.name not in KEEPDIMS or len(eqn.outvars) != 1:
        return False
    return int(np.prod(eqn.invars[0].aval.shape)) == int(np.prod(eqn.outvars[0].aval.shape))


def average_sum_of(div_eqn, producers: dict):
    """The ``reduce_window_sum`` / ``reduce_sum`` whose (reshaped) output ``div_eqn`` divides, or None."""
    eqn = producers.get(div_eqn.invars[0])
    while eqn is not None and _keeps_dims(eqn):
        eqn = producers.get(eqn.invars[0])
    return eqn if eqn is not None and eqn.primitive.name in AVERAGE_SUMS else None


def _scalar(var, known: dict):
    """The float value of a scalar literal (or of a body variable bound to one), else None."""
    if isinstance(var, Literal):
        value = np.asarray(var.val)
        return float(value) if value.size == 1 else None
    return known.get(var)


def clamp_chain(eqn) -> tuple[tuple[str, float], ...] | None:
    """``(("max", lo), ("min", hi), ...)`` when ``eqn`` clamps its one array input by scalar constants: a
    ``max`` / ``min`` / ``clamp`` with scalar literals, or a call whose body is only that (``jax.nn.relu``,
    ``jax.nn.relu6``, ``jnp.clip``). None otherwise. These ops commute with quantization: on the integers they
    are the same max / min with the bounds quantized."""
    name = eqn.primitive.name
    if name in ("max", "min") and len(eqn.invars) == 2:
        for data, bound in ((0, 1), (1, 0)):
            value = _scalar(eqn.invars[bound], {})
            if value is not None and not isinstance(eqn.invars[data], Literal):
                return ((name, value),)
        return None
    if name == "clamp":  # lax.clamp(lo, x, hi)
        lo, hi = _scalar(eqn.invars[0], {}), _scalar(eqn.invars[2], {})
        return None if lo is None or hi is None else (("max", lo), ("min", hi))
    bodies = [v for v in eqn.params.values() if isinstance(v, ClosedJaxpr | Jaxpr)]
    if len(bodies) != 1:
        return None
    body = bodies[0].jaxpr if isinstance(bodies[0], ClosedJaxpr) else bodies[0]
    arrays = [i for i, v in enumerate(eqn.invars) if _scalar(v, {}) is None]
    if len(arrays) != 1 or len(body.invars) != len(eqn.invars):
        return None
    known = {b: _scalar(v, {}) for b, v in zip(body.invars, eqn.invars, strict=True) if _scalar(v, {}) is not None}
    data, steps = body.invars[arrays[0]], []
    for inner in body.eqns:
        if inner.primitive.name == "convert_element_type" and inner.invars[0] in known:
            known[inner.outvars[0]] = known[inner.invars[0]]  # jnp.clip's integer bounds, made float
            continue
        if data not in inner.invars:
            return None
        chain = _bounded(inner, data, known)
        if chain is None:
            return None
        steps.extend(chain)
        data = inner.outvars[0]
    return tuple(steps) if steps and body.outvars == [data] else None


def clamp_input(eqn):
    """The array operand of an equation ``clamp_chain`` accepts."""
    index = 1 if eqn.primitive.name == "clamp" else next(i for i, v in enumerate(eqn.invars) if _scalar(v, {}) is None)
    return eqn.invars[index]


def _bounded(eqn, data, known: dict):
    """The clamp steps of one body equation reading ``data`` (bounds from ``known`` body scalars)."""
    name = eqn.primitive.name
    if name in ("max", "min") and len(eqn.invars) == 2:
        other = eqn.invars[1] if eqn.invars[0] is data else eqn.invars[0]
        value = _scalar(other, known)
        return None if value is None else ((name, value),)
    return clamp_chain(eqn)  # a nested call (relu6's jit inside its custom_jvp); its array input is ``data``


def _literal_mul_operand(eqn):
    """``v`` when ``eqn`` is ``c * v`` or ``v * c`` with a scalar literal ``c``, else None."""
    if eqn is None or eqn.primitive.name != "mul" or len(eqn.invars) != 2:
        return None
    a, b = eqn.invars
    if _scalar(a, {}) is not None and not isinstance(b, Literal):
        return b
    if _scalar(b, {}) is not None and not isinstance(a, Literal):
        return a
    return None


def composite_internals(jaxpr: Jaxpr, producers: dict) -> set[int]:
    """``id`` of the equations inside a tanh-approximated GELU (``jax.nn.gelu``, which traces inline:
    ``tanh(c * (x + k * x**3))``): its ``add`` and ``tanh`` are one float op in torch, never sites of their own.
    ``producers``: ``{var: eqn}`` of ``jaxpr``."""
    found: set[int] = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != "tanh":
            continue
        inner = producers.get(_literal_mul_operand(producers.get(eqn.invars[0])))
        if inner is None or inner.primitive.name != "add" or len(inner.invars) != 2:
            continue
        for x, cubed in (inner.invars, inner.invars[::-1]):
            power = producers.get(_literal_mul_operand(producers.get(cubed)))
            if power is not None and power.primitive.name == "integer_pow" and power.params.get("y") == 3 \
                    and power.invars[0] is x:
                found.update((id(inner), id(eqn)))
    return found
