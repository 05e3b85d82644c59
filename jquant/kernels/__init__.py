"""Integer execution kernels: int8 x int8 -> int32 dot / conv / matmul, weight-only int8 / int4, activation
quantization, and ``QuantizedWeight`` (weights quantized once ahead of time). This layer imports only
``jquant.numerics``; the converter that drives these kernels through the quantize transform is ``jquant.convert``.

On x86-64 CPUs the kernels run native C++ code through the XLA FFI (``backend()`` says which; ``JQUANT_KERNELS=xla``
or ``xla_kernels()`` forces the XLA form); ``pack_weight`` packs a weight once for them.
"""

from jquant.kernels.activation import quantize_activation
from jquant.kernels.conv import conv_contracting_axes, dynamic_int8_conv, int8_conv, pack_conv_weight
from jquant.kernels.dot import dynamic_int8_dot_general, int8_dot_general, weight_only_dot_general
from jquant.kernels.matmul import int8_matmul
from jquant.kernels.native import backend, export_safety_checks, xla_kernels
from jquant.kernels.weights import QuantizedWeight, pack_weight, quantize_weight, tree_nbytes

__all__ = [
    "QuantizedWeight",
    "backend",
    "conv_contracting_axes",
    "dynamic_int8_conv",
    "dynamic_int8_dot_general",
    "export_safety_checks",
    "int8_conv",
    "int8_dot_general",
    "int8_matmul",
    "pack_conv_weight",
    "pack_weight",
    "quantize_activation",
    "quantize_weight",
    "tree_nbytes",
    "weight_only_dot_general",
    "xla_kernels",
]
