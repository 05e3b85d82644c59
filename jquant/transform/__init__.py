"""The quantize transform: sites, rules, the jaxpr interpreter and the qstate (see api.py)."""

from jquant.transform import presets
from jquant.transform.api import QuantizedFunction, quantize
from jquant.transform.compare import CompareReport, compare
from jquant.transform.interpreter import bind_eqn, interpret
from jquant.transform.plan import Plan, UnsupportedPrimitiveError
from jquant.transform.sites import Operand, Site
from jquant.transform.specs import (
    DerivedQuantizationSpec,
    FixedQParamsSpec,
    QuantizationSpec,
    Rule,
    SharedQuantizationSpec,
)
from jquant.transform.state import learnable_params, merge_learnable

__all__ = [
    "CompareReport",
    "compare",
    "DerivedQuantizationSpec",
    "FixedQParamsSpec",
    "Operand",
    "Plan",
    "QuantizationSpec",
    "QuantizedFunction",
    "Rule",
    "SharedQuantizationSpec",
    "Site",
    "UnsupportedPrimitiveError",
    "bind_eqn",
    "interpret",
    "learnable_params",
    "merge_learnable",
    "presets",
    "quantize",
]
