"""A backend's quantization policy as one object: PT2E's ``Quantizer`` (``annotate`` / ``validate``) on jquant sites.

``jquant.quantize(fn, quantizer)`` asks the quantizer, while it discovers the sites of the traced function:

- ``primitives``: which primitives may be sites (every ``dot_general`` / ``conv_general_dilated`` by default);
- ``annotate(candidate) -> Annotation | None``: the specs of one site (its weight, activation inputs, output),
  given a ``Candidate`` (name, primitive, operand roles / shapes / parameter paths); None keeps it in float;
- graph options, the part of a backend's policy that spans several equations (torch FX's fusion patterns and
  its "share qparams with the input" ops; see ``jquant.transform.patterns``):
  ``fold_batchnorm`` (conv / dense + inference BatchNorm folded into the kernel before anything is observed),
  ``fuse`` (a dot / conv output is observed after its bias add and a ReLU; an add output after a ReLU),
  ``share_through`` (value-preserving primitives whose output reuses the qparams of an already quantized input:
  no new observer, the input's observer also sees the output, as torch's shared observers do),
  ``share_concatenate`` (a concatenate's inputs and output share one observer: the first input's),
  ``opaque_calls`` (names of ``jit`` / ``custom_jvp`` calls that are one float op to this backend, e.g. "gelu":
  nothing inside them becomes a site, as torch never quantizes inside its GELU module);
- ``validate(sites)``: raise on a plan the backend cannot run (called once per traced signature).

A list of ``Rule`` is a quantizer too (``RuleQuantizer``: first matching rule wins, no graph options), so
existing configs keep their meaning. A quantizer of your own::

    import jquant
    from jquant.transform.quantizer import Annotation, Quantizer

    W8 = jquant.QuantizationSpec("int8", "per_channel_symmetric")
    A8 = jquant.QuantizationSpec("uint8", observer="histogram", observer_kwargs={"reduce_range": True})

    class MyBackend(Quantizer):
        primitives = ("dot_general", "conv_general_dilated", "add")
        fuse = True                                  # observe after bias add / ReLU
        share_through = frozenset({"reshape", "transpose", "reduce_window_max"})

        def annotate(self, site):
            if "head" in site.name:                  # keep the classifier in float
                return None
            if site.primitive == "add":
                return Annotation(inputs=A8, output=A8)
            return Annotation(weight=W8, inputs=A8, output=A8)

    qf = jquant.quantize(fn, MyBackend())
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

from jquant.transform.specs import (
    DEFAULT_PRIMITIVES,
    Rule,
    Spec,
    _check_spec,
    checked_inputs,
    input_spec_at,
    normalize_config,
)

# Primitives through which a quantized value keeps its qparams in torch FX's x86 backend (max-pool, flatten /
# reshape, transpose, squeeze / unsqueeze, a standalone ReLU / ReLU6 / Hardtanh / clamp): the output shares the
# input's observer. "relu" names ``jax.nn.relu`` / ``max(x, 0)``, "clamp" any max / min by constants
# (``jax.nn.relu6``, ``jnp.clip``, ``lax.clamp``); neither is a primitive of its own.
VALUE_PRESERVING = frozenset(
    {"reduce_window_max", "reshape", "transpose", "squeeze", "expand_dims", "relu", "clamp"}
)


class Candidate(NamedTuple):
    """What ``Quantizer.annotate`` sees of one equation that may become a site."""

    name: str
    primitive: str
    roles: tuple[str, ...]  # per floating-point operand: "weight" or "input"
    shapes: tuple[tuple[int, ...], ...]
    param_paths: tuple[str | None, ...]
    constants: tuple[bool, ...] = ()  # per operand: computed from constants only (an "input" that is no activation)


@dataclasses.dataclass(frozen=True)
class Annotation:
    """The specs of one site: ``weight`` (weight operands), ``inputs`` (activation operands: one spec for all or
    a tuple, one per operand), ``output``. ``None``: keep that tensor in float."""

    weight: Spec = None
    inputs: Spec | tuple[Spec, ...] = None
    output: Spec = None

    def __post_init__(self) -> None:
        _check_spec("weight", self.weight)
        _check_spec("output", self.output)
        object.__setattr__(self, "inputs", checked_inputs(self.inputs))

    def input_spec(self, position: int) -> Spec:
        return input_spec_at(self.inputs, position)

    def describe(self) -> str:
        return f"Annotation(weight={self.weight}, inputs={self.inputs}, output={self.output})"


class Quantizer:
    """Base class of a backend policy (see the module docstring). Subclasses override ``annotate``."""

    primitives: tuple[str, ...] = DEFAULT_PRIMITIVES
    fold_batchnorm: bool = False
    fuse: bool = False
    share_through: frozenset[str] = frozenset()
    share_concatenate: bool = False
    opaque_calls: frozenset[str] = frozenset()

    def annotate(self, site: Candidate) -> Annotation | Rule | None:
        raise NotImplementedError(f"{type(self).__name__}.annotate(site) must return an Annotation or None")

    def validate(self, sites: list) -> None:
        """Raise a ValueError naming the site when the plan cannot run on this backend (default: accept)."""

    @property
    def shares(self) -> bool:
        """Whether quantized values carry their qparams to their consumers (implicit sharing)."""
        return bool(self.fuse or self.share_through or self.share_concatenate)


class RuleQuantizer(Quantizer):
    """A list of ``Rule`` as a quantizer: a site takes the specs of the first rule matching its name and
    primitive. ``strict``: a rule that matches no site raises instead of warning (``optional`` rules excepted).
    Graph options as keywords."""

    def __init__(
        self,
        rules: Any,
        *,
        strict: bool = False,
        fold_batchnorm: bool = False,
        fuse: bool = False,
        share_through: frozenset[str] | tuple[str, ...] = frozenset(),
        share_concatenate: bool = False,
        opaque_calls: frozenset[str] | tuple[str, ...] = frozenset(),
        optional: tuple[Rule, ...] = (),
    ):
        self.rules = normalize_config(rules)
        self.strict = strict
        self.optional = tuple(optional)  # rules that may match nothing without a warning (a preset's extras)
        # No rules (config=[]): no candidates at all, so nothing is even looked at (the escape hatch).
        named = tuple(p for r in self.rules for p in r.primitives)
        self.primitives = tuple(dict.fromkeys(DEFAULT_PRIMITIVES + named)) if self.rules else ()
        self.fold_batchnorm = fold_batchnorm
        self.fuse = fuse
        self.share_through = frozenset(share_through)
        self.share_concatenate = share_concatenate
        self.opaque_calls = frozenset(opaque_calls)

    def annotate(self, site: Candidate) -> Rule | None:
        for rule in self.rules:
            if rule.matches(site.name, site.primitive):
                return rule
        return None

    def unmatched(self, sites: list) -> tuple[Rule, ...]:
        used = {id(s.rule) for s in sites} | {id(r) for r in self.optional}
        return tuple(r for r in self.rules if id(r) not in used)

    def validate(self, sites: list) -> None:
        unmatched = self.unmatched(sites)
        if unmatched:
            message = (
                f"jquant.quantize: {len(unmatched)} rule(s) matched no site: "
                f"{', '.join(r.describe() for r in unmatched)}. Sites: {[s.name for s in sites]}"
            )
            if self.strict:
                raise ValueError(message)
            warnings.warn(message, stacklevel=5)

    def __repr__(self) -> str:
        options = [k for k in ("fold_batchnorm", "fuse", "share_concatenate") if getattr(self, k)]
        if self.share_through:
            options.append(f"share_through={sorted(self.share_through)}")
        return f"RuleQuantizer({len(self.rules)} rule(s){', ' if options else ''}{', '.join(options)})"


def as_quantizer(config: Any, strict: bool = False) -> Quantizer:
    """``config`` as a quantizer: a ``Quantizer`` as it is, a Rule or list of Rules as a ``RuleQuantizer``."""
    if isinstance(config, Quantizer):
        return config
    if isinstance(config, Rule | list | tuple):
        return RuleQuantizer(config, strict=strict)
    raise TypeError(
        f"config: expected a jquant Quantizer, a Rule or a list of Rules, got {type(config).__name__}"
    )
