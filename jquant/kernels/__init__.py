"""Integer execution kernels: int8 x int8 -> int32 dot / conv / matmul, activation quantization, and
``QuantizedWeight`` (weights quantized once ahead of time). This layer imports only ``jquant.numerics``;
the converter that drives these kernels through the quantize transform is ``jquant.convert``.
"""

from jquant.kernels.activation import quantize_activation
from jquant.kernels.conv import dynamic_int8_conv, int8_conv
from jquant.kernels.dot import dynamic_int8_dot_general, int8_dot_general, weight_only_dot_general
from jquant.kernels.matmul import int8_matmul
from jquant.kernels.weights import QuantizedWeight, quantize_weight, tree_nbytes

__all__ = [
    "QuantizedWeight",
    "dynamic_int8_conv",
    "dynamic_int8_dot_general",
    "int8_conv",
    "int8_dot_general",
    "int8_matmul",
    "quantize_activation",
    "quantize_weight",
    "tree_nbytes",
    "weight_only_dot_general",
]
