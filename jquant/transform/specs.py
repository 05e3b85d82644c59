"""What to do with one tensor at a site: the spec classes, and ``Rule`` (which sites get which specs).

All classes are frozen, validated dataclasses so a config is a hashable value that can key the trace cache.

- ``QuantizationSpec``: observe a tensor (or compute its qparams on the fly when ``is_dynamic``) and
  fake-quantize it with a straight-through (``"ste"``) or learnable (``"lsq"``) fake quant.
- ``FixedQParamsSpec`` (alias ``FixedQParamsQuantizationSpec``): constant qparams, e.g. a sigmoid output on
  ``[0, 1]`` with scale 1/256.
- ``SharedQuantizationSpec``: reuse the qparams (and observer) of another tensor, named by its role key
  (``"input0"``, ``"weight"``, ``"output"``) in this site or in another site: e.g. the inputs of a concatenate.
- ``DerivedQuantizationSpec``: qparams computed from other tensors' qparams, e.g. an int32 bias whose scale is
  the activation scale times the weight scale. References are role keys of the same site,
  ``"producer:<role>"`` for the site that produced this site's activation input (the dot before a bias add), or
  ``"<site name>:<role>"`` for any earlier site in the same scope.
- ``None`` anywhere a spec is expected: leave that tensor in float.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from jquant.numerics.qschemes import canonical_qscheme, is_per_channel
from jquant.numerics.qtypes import canonical_dtype, is_float_qtype, qrange

FAKE_QUANTS = ("ste", "lsq")
# Sites every rule considers unless it names its own primitives.
DEFAULT_PRIMITIVES = ("dot_general", "conv_general_dilated")


@dataclasses.dataclass(frozen=True)
class QuantizationSpec:
    """How to quantize one tensor.

    Args:
      dtype: quantized dtype name ("int8", "uint8", "int4", "float8_e4m3fn", ...; torch aliases accepted).
      qscheme: torch qscheme name; ``per_channel_*`` on a weight uses its output-feature dim(s).
      observer: short observer name (see ``jquant.observers.get_observer``), an observer instance, or None for
        "minmax" / "per_channel_minmax" according to ``qscheme``.
      quant_min, quant_max: custom integer range (default: the full range of ``dtype``).
      ch_axis: per-channel axis of this operand; None picks the output-feature dim for weights, and is
        required for per-channel activations.
      block_size: group size along the contraction dim(s) of a weight (per-group qparams, e.g. int4 g=128).
      is_dynamic: compute qparams from the current tensor at every call (no observer state).
      fake_quant: "ste" (straight-through, qparams from the observer) or "lsq" (learnable scale/zero point).
      observer_kwargs: extra keyword arguments for the observer (e.g. ``(("averaging_constant", 0.01),)``).
    """

    dtype: str = "int8"
    qscheme: str = "per_tensor_affine"
    observer: Any = None
    quant_min: int | None = None
    quant_max: int | None = None
    ch_axis: int | None = None
    block_size: int | None = None
    is_dynamic: bool = False
    fake_quant: str = "ste"
    observer_kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "qscheme", canonical_qscheme(self.qscheme))
        if self.fake_quant not in FAKE_QUANTS:
            raise ValueError(f"fake_quant: expected one of {FAKE_QUANTS}, got {self.fake_quant!r}")
        if not is_float_qtype(self.dtype):
            qrange(self.dtype, self.quant_min, self.quant_max)  # validates a custom range
        elif self.fake_quant == "lsq":
            raise ValueError(f"fake_quant='lsq' needs an integer dtype, got {self.dtype!r}")
        if self.block_size is not None:
            if not isinstance(self.block_size, int) or self.block_size <= 0:
                raise ValueError(f"block_size: expected a positive int group size, got {self.block_size!r}")
        if self.is_dynamic and self.fake_quant == "lsq":
            raise ValueError("is_dynamic=True and fake_quant='lsq' exclude each other (dynamic qparams are not learnt)")
        if isinstance(self.observer_kwargs, dict):
            object.__setattr__(self, "observer_kwargs", tuple(sorted(self.observer_kwargs.items())))

    @property
    def per_channel(self) -> bool:
        return is_per_channel(self.qscheme) or self.block_size is not None


@dataclasses.dataclass(frozen=True)
class FixedQParamsSpec:
    """Constant qparams (no observer), e.g. ``FixedQParamsSpec(1 / 256, 0, "uint8")`` for a sigmoid output."""

    scale: float
    zero_point: int = 0
    dtype: str = "uint8"
    quant_min: int | None = None
    quant_max: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if not float(self.scale) > 0:
            raise ValueError(f"scale: must be > 0, got {self.scale!r}")
        if not is_float_qtype(self.dtype):
            qmin, qmax = qrange(self.dtype, self.quant_min, self.quant_max)
            if not qmin <= int(self.zero_point) <= qmax:
                raise ValueError(f"zero_point: {self.zero_point} outside [{qmin}, {qmax}]")


@dataclasses.dataclass(frozen=True)
class SharedQuantizationSpec:
    """Use the qparams (and observer) of another tensor instead of an observer of its own.

    ``target`` is a role key ("input0", "output", ...) of this site, or of the site named by ``site``
    (PT2E's sharing by edge or node across ops). Within a site the target's observer sees both tensors
    (an input sharing "output" is observed before the output, as a torch ``cat`` group). Across sites the
    tensor is fake-quantized with the other site's stored qparams; jquant's planner creates such specs itself
    for values that are already quantized (implicit sharing, see ``jquant.transform.quantizer``).
    """

    target: str
    site: str | None = None
    # The target's QuantizationSpec, filled in by the planner for cross-site sharing (users leave it None).
    spec: Any = dataclasses.field(default=None, compare=False, repr=False)


def _product_of_scales(*qparams: tuple[Any, Any]) -> tuple[Any, Any]:
    import jax.numpy as jnp

    scale = qparams[0][0]
    for other, _ in qparams[1:]:
        scale = scale * other
    return scale, jnp.zeros(jnp.shape(scale), jnp.int32)


@dataclasses.dataclass(frozen=True)
class DerivedQuantizationSpec:
    """Qparams derived from other tensors' qparams (default: the product of their scales, zero point 0).

    ``derived_from`` holds role keys of this site, ``"producer:<role>"`` (the site that produced this site's
    activation input, in the same scope) or ``"<site name>:<role>"`` (any earlier site in the same scope, e.g.
    ``"Conv_0/conv_general_dilated:output"``). ``derive_fn(*[(scale, zp), ...]) -> (scale, zp)``.
    """

    derived_from: tuple[str, ...]
    derive_fn: Callable[..., tuple[Any, Any]] = _product_of_scales
    dtype: str = "int32"
    quant_min: int | None = None
    quant_max: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if isinstance(self.derived_from, str):
            object.__setattr__(self, "derived_from", (self.derived_from,))
        if not self.derived_from:
            raise ValueError("derived_from: name at least one tensor (e.g. ('producer:input', 'producer:weight'))")


# PT2E's name for the same thing.
FixedQParamsQuantizationSpec = FixedQParamsSpec

Spec = QuantizationSpec | FixedQParamsSpec | SharedQuantizationSpec | DerivedQuantizationSpec | None
SPEC_TYPES = (QuantizationSpec, FixedQParamsSpec, SharedQuantizationSpec, DerivedQuantizationSpec)


def _check_spec(name: str, spec: Any) -> None:
    if spec is not None and not isinstance(spec, SPEC_TYPES):
        raise TypeError(f"{name}: expected a QuantizationSpec-like spec or None, got {type(spec).__name__}")


def checked_inputs(inputs: Any) -> Any:
    """``inputs`` of a Rule / Annotation validated: one spec for every activation operand, or a tuple, one each."""
    if isinstance(inputs, list | tuple):
        inputs = tuple(inputs)
        for i, spec in enumerate(inputs):
            _check_spec(f"inputs[{i}]", spec)
    else:
        _check_spec("inputs", inputs)
    return inputs


def input_spec_at(inputs: Any, position: int) -> Spec:
    """The spec of the ``position``-th activation operand (None past the end of a tuple)."""
    if isinstance(inputs, tuple):
        return inputs[position] if position < len(inputs) else None
    return inputs


@dataclasses.dataclass(frozen=True)
class Rule:
    """One config entry. A site takes the specs of the FIRST rule that matches it.

    Args:
      pattern: regular expression searched (``re.search``) in the site name; None matches every name.
      primitives: primitive names this rule applies to (default: dot_general and conv_general_dilated).
        Naming another primitive (e.g. "add", "concatenate", "logistic") makes its equations sites; "softmax"
        names the last equation of each ``jax.nn.softmax`` (its output only: the spec goes in ``output``).
      weight: spec for operands that come from the weights argument.
      inputs: spec for activation operands: one spec for all, or a tuple with one spec per activation operand.
      output: spec for the site's output (optional).
      weight_fallback: spec for a weight that ``weight`` cannot quantize (its group size does not divide the
        weight's contraction size); None makes such a site an error. Sites that fall back are listed in one
        warning and in ``site.note``.
    A rule whose specs are all None keeps the matched sites in float (useful to exclude a layer).
    """

    pattern: str | None = None
    primitives: tuple[str, ...] = DEFAULT_PRIMITIVES
    weight: Spec = None
    inputs: Spec | tuple[Spec, ...] = None
    output: Spec = None
    weight_fallback: Spec = None

    def __post_init__(self) -> None:
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern: invalid regular expression {self.pattern!r}: {err}") from err
        prims = (self.primitives,) if isinstance(self.primitives, str) else tuple(self.primitives)
        if not prims:
            raise ValueError("primitives: name at least one primitive")
        object.__setattr__(self, "primitives", prims)
        _check_spec("weight", self.weight)
        _check_spec("output", self.output)
        _check_spec("weight_fallback", self.weight_fallback)
        object.__setattr__(self, "inputs", checked_inputs(self.inputs))

    def matches(self, site_name: str, primitive: str) -> bool:
        if primitive not in self.primitives:
            return False
        return self.pattern is None or re.search(self.pattern, site_name) is not None

    def input_spec(self, position: int) -> Spec:
        """Spec for the ``position``-th activation operand of a site."""
        return input_spec_at(self.inputs, position)

    def describe(self) -> str:
        return f"Rule(pattern={self.pattern!r}, primitives={self.primitives})"


def normalize_config(config: Any) -> tuple[Rule, ...]:
    """Turn ``config`` (a Rule, or a sequence of Rules) into a tuple of rules."""
    if isinstance(config, Rule):
        return (config,)
    if not isinstance(config, list | tuple):
        raise TypeError(f"config: expected a Rule or a list of Rules, got {type(config).__name__}")
    for i, rule in enumerate(config):
        if not isinstance(rule, Rule):
            raise TypeError(f"config[{i}]: expected a jquant Rule, got {type(rule).__name__}")
    return tuple(config)
