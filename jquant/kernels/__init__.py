"""Integer execution: weights quantized once ahead of time, int8 x int8 -> int32 dot / conv kernels,
serialization and ``jax.export`` of the resulting integer functions.

``jquant.convert`` is also callable: ``int_fn, int_params = jquant.convert(qf, qstate, *args)`` forwards to
``jquant.transform.convert.convert``. This layer (the kernels) does not depend on the transform; the
converter and the QAT fast path (``jquant.transform.fast_qat``) sit in the transform layer, which drives
these kernels through its interpreter hook; the forwards below are lazy so imports still point downwards.
"""

import sys
import types

from jquant.convert.activation import quantize_activation
from jquant.convert.conv import dynamic_int8_conv, int8_conv
from jquant.convert.dot import dynamic_int8_dot_general, int8_dot_general, weight_only_dot_general
from jquant.convert.matmul import int8_matmul
from jquant.convert.serialize import export_int_fn, load_exported, load_int_params, save_int_params
from jquant.convert.weights import QuantizedWeight, quantize_weight, tree_nbytes

__all__ = [
    "QuantizedWeight",
    "dynamic_int8_conv",
    "dynamic_int8_dot_general",
    "export_int_fn",
    "int8_conv",
    "int8_dot_general",
    "int8_matmul",
    "load_exported",
    "load_int_params",
    "qat_apply",
    "quantize_activation",
    "quantize_weight",
    "save_int_params",
    "tree_nbytes",
    "weight_only_dot_general",
]


def __getattr__(name):
    if name == "qat_apply":
        from jquant.transform.fast_qat import qat_apply

        return qat_apply
    raise AttributeError(f"module 'jquant.convert' has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """Lets ``jquant.convert(qf, qstate, *args)`` call the converter while ``jquant.convert.*`` stays a package."""

    def __call__(self, qf, qstate, *args, **kwargs):
        from jquant.transform.convert import convert

        return convert(qf, qstate, *args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
