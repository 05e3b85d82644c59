"""The quantize transform: sites, rules, the jaxpr interpreter and the qstate (see api.py).

Public API below. Extension API (documented in their modules, stable within a minor version):
``jquant.transform.interpreter.interpret`` / ``bind_eqn`` (run a traced function with a site hook, as the
converter does) and ``jquant.transform.higher_order.RULES`` (one rule per higher-order primitive).
"""

from jquant.transform.api import QuantizedFunction, quantize
from jquant.transform.compare import CompareReport, compare
from jquant.transform.plan import UnsupportedPrimitiveError
from jquant.transform.quantizer import Annotation, Candidate, Quantizer, RuleQuantizer
from jquant.transform.sites import Operand, Site, View
from jquant.transform.slots import LearnableSlot, ObservedSlot, QParams
from jquant.transform.specs import (
    DerivedQuantizationSpec,
    FixedQParamsQuantizationSpec,
    FixedQParamsSpec,
    QuantizationSpec,
    Rule,
    SharedQuantizationSpec,
)
from jquant.transform.state import learnable_params, merge_learnable

__all__ = [
    "Annotation",
    "Candidate",
    "CompareReport",
    "DerivedQuantizationSpec",
    "FixedQParamsQuantizationSpec",
    "FixedQParamsSpec",
    "LearnableSlot",
    "ObservedSlot",
    "Operand",
    "QParams",
    "QuantizationSpec",
    "QuantizedFunction",
    "Quantizer",
    "Rule",
    "RuleQuantizer",
    "SharedQuantizationSpec",
    "Site",
    "View",
    "UnsupportedPrimitiveError",
    "compare",
    "learnable_params",
    "merge_learnable",
    "quantize",
]
