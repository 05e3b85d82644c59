"""Integer execution: weights quantized once ahead of time, int8 x int8 -> int32 dot / conv kernels,
serialization and ``jax.export`` of the resulting integer functions."""

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
    "quantize_activation",
    "quantize_weight",
    "save_int_params",
    "tree_nbytes",
    "weight_only_dot_general",
]
