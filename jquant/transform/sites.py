"""Site records (what ``qf.sites`` lists) and site naming.

A *site* is one equation of the traced function whose tensors may be quantized: every ``dot_general`` and
``conv_general_dilated``, plus any primitive a rule names (``add``, ``concatenate``, ``logistic``, ...).

Names are stable and readable:
- Flax linen: the module path from the equation's name stack, e.g. ``CNN/Conv_0/conv_general_dilated``;
- otherwise (nnx, equinox, plain functions): the parameter path of the weight operand, e.g.
  ``layers/0/kernel/dot_general``; sites without a weight and without a name stack use the primitive name;
- repeats get a counter suffix: ``dot_general``, ``dot_general_1``, ...
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from jquant.transform.specs import Rule, Spec


@dataclasses.dataclass(frozen=True)
class Operand:
    """One quantizable input of a site.

    ``index`` is the position in the equation's inputs; ``role`` is "weight" (flows from the weights
    argument) or "input" (an activation); ``key`` names its entry in the site's qstate. For weights,
    ``out_axes`` are the output-feature dims (per-channel axes) and ``contract_axes`` the contraction dims.
    """

    index: int
    role: str
    key: str
    shape: tuple[int, ...]
    dtype: str
    spec: Spec
    param_path: str | None = None
    out_axes: tuple[int, ...] = ()
    contract_axes: tuple[int, ...] = ()
    producer: str | None = None


@dataclasses.dataclass(frozen=True)
class Site:
    """A quantizable equation: name, primitive, operands with their specs, output, matched rule.

    ``stack`` holds the trip counts of the enclosing scans (outermost first): every qstate leaf of this site
    has these leading dims (per-iteration statistics). ``in_while`` marks sites in a while-loop body, whose
    statistics are merged over iterations.
    """

    name: str
    primitive: str
    operands: tuple[Operand, ...]
    output_shape: tuple[int, ...]
    output_dtype: str
    output_spec: Spec
    rule: Rule | None
    stack: tuple[int, ...] = ()
    in_while: bool = False
    note: str = ""  # why a site's specs differ from its rule's (e.g. a weight_fallback), for reports
    # Primitives fused after the site's equation (e.g. ("add", "relu"): bias add and ReLU); the output spec
    # then applies to the last of them (see ``View``), as torch observes LinearReLU / add_relu outputs.
    fused: tuple[str, ...] = ()

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(op.role for op in self.operands)

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(op.shape for op in self.operands)

    @property
    def specs(self) -> dict[str, Spec]:
        """Chosen spec per role key (operands, then "output" when the output is quantized)."""
        out = {op.key: op.spec for op in self.operands}
        if self.output_spec is not None:
            out["output"] = self.output_spec
        return out

    @property
    def quantized(self) -> bool:
        return any(spec is not None for spec in self.specs.values())

    def operand(self, key: str) -> Operand:
        for op in self.operands:
            if op.key == key:
                return op
        raise KeyError(f"site {self.name!r} has no operand {key!r}; operands: {[op.key for op in self.operands]}")

    def __str__(self) -> str:
        parts = ", ".join(f"{op.key}{list(op.shape)}={_short(op.spec)}" for op in self.operands)
        out = f", output={_short(self.output_spec)}" if self.output_spec is not None else ""
        stack = f" stacked{list(self.stack)}" if self.stack else ""
        fused = f"+{'+'.join(self.fused)}" if self.fused else ""
        return f"{self.name} [{self.primitive}{fused}]{stack}: {parts}{out}"


@dataclasses.dataclass(frozen=True)
class View:
    """Another equation where a site's slot is used: observe / fake-quantize there with the site's qparams.

    Views are what make one observer span several equations, as torch's shared observers do: the last equation
    of a fused pattern (the ReLU after a conv's bias add: ``key="output"``), a value-preserving op on a quantized
    value (max-pool, reshape: the owner's observer also sees its output), or a concatenate whose inputs join
    the first input's observer (``inputs``: operand positions observed and fake-quantized before the equation).
    ``name`` is the owning site's name (its qstate entry); ``primitive`` the viewed equation's primitive.
    A plan maps such equations to ``View`` records in ``Plan.by_eqn``; ``qf.sites`` lists only sites.
    """

    name: str
    key: str
    spec: Any
    primitive: str
    inputs: tuple[int, ...] = ()
    output: bool = True

    def __str__(self) -> str:
        observed = [f"input{i}" for i in self.inputs] + (["output"] if self.output else [])
        return f"view of {self.name}[{self.key}] at {self.primitive}: {', '.join(observed)}"


def _short(spec: Spec) -> str:
    if spec is None:
        return "float"
    fields = [
        f"{k}={v!r}" for k, v in vars(spec).items() if k in ("dtype", "qscheme", "target", "site", "scale")
        and not (k == "site" and v is None)
    ]
    return f"{type(spec).__name__}({', '.join(fields)})"


def path_to_name(path: tuple[Any, ...]) -> str:
    """``(DictKey('params'), DictKey('Dense_0'), ...)`` -> ``"params/Dense_0/..."`` (nnx ``.value`` dropped)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    if len(parts) > 1 and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return "/".join(parts)


_TRANSFORM_WRAPPER = re.compile(r"^(jvp|transpose|vmap|remat|checkpoint|pjit|jit)\((.*)\)$")


def clean_name_stack(stack: str) -> str:
    """Drop transform wrappers (``jvp(...)``) so a site keeps its name under grad and vmap."""
    parts = []
    for part in stack.split("/"):
        while True:
            match = _TRANSFORM_WRAPPER.match(part)
            if not match:
                break
            part = match.group(2)
        if part:
            parts.append(part)
    return "/".join(parts)


class Namer:
    """Hands out unique names, appending ``_1``, ``_2``, ... to repeats."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __call__(self, base: str) -> str:
        name = self.peek(base)
        self._counts[base] = self._counts.get(base, 0) + 1
        return name

    def peek(self, base: str) -> str:
        """The name the next call would hand out, without taking it."""
        count = self._counts.get(base, 0)
        return base if count == 0 else f"{base}_{count}"


def site_base_name(name_stack: str, weight_path: str | None, primitive: str) -> str:
    # A linen name stack holds unique instance names (CNN/Conv_0). equinox scopes are class paths
    # (eqx.nn.MLP/eqx.nn.Linear) shared by every instance, so there the parameter path names the site better.
    class_scoped = any("." in part for part in name_stack.split("/"))
    if name_stack and not (class_scoped and weight_path):
        return f"{name_stack}/{primitive}"
    if weight_path:
        return f"{weight_path}/{primitive}"
    return primitive


def role_keys(roles: list[str], indices: list[int]) -> list[str]:
    """"weight"/"input" when a role occurs once in the site, else the role plus the operand index."""
    keys = []
    for role, index in zip(roles, indices, strict=True):
        keys.append(role if roles.count(role) == 1 else f"{role}{index}")
    return keys
