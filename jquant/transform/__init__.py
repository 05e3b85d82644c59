"""The quantize transform: sites, rules, the jaxpr interpreter and the qstate (see api.py).

Public API below. Extension API (documented in their modules, stable within a minor version):
``jquant.transform.interpreter.interpret`` / ``bind_eqn`` (run a traced function with a site hook, as the
converter does) and ``jquant.transform.higher_order.RULES`` (one rule per higher-order primitive).
"""

from jquant.transform.api import QuantizedFunction, quantize
from jquant.transform.compare import CompareReport, compare
from jquant.transform.plan import UnsupportedPrimitiveError
from jquant.transform.sites import Operand, Site
from jquant.transform.slots import LearnableSlot, ObservedSlot, QParams
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
    "DerivedQuantizationSpec",
    "FixedQParamsSpec",
    "LearnableSlot",
    "ObservedSlot",
    "Operand",
    "QParams",
    "QuantizationSpec",
    "QuantizedFunction",
    "Rule",
    "SharedQuantizationSpec",
    "Site",
    "UnsupportedPrimitiveError",
    "compare",
    "learnable_params",
    "merge_learnable",
    "quantize",
]
