"""jquant: quantization for JAX with PyTorch-exact numerics."""

from jquant import kernels, observers, presets
from jquant.numerics.affine import dequantize_affine, fake_quantize_affine, quantize_affine
from jquant.numerics.fake_quant import fake_quantize_per_channel_affine, fake_quantize_per_tensor_affine
from jquant.numerics.lsq import (
    fake_quantize_learnable_per_channel_affine,
    fake_quantize_learnable_per_tensor_affine,
)
from jquant.numerics.packing import pack_int4, unpack_int4
from jquant.numerics.qparams import FLOAT32_EPS, choose_qparams
from jquant.numerics.qschemes import QSCHEMES
from jquant.numerics.qtypes import QTYPES, qrange
from jquant.observers import (
    FixedQParamsObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    get_observer,
)
from jquant.transform import (
    Annotation,
    DerivedQuantizationSpec,
    FixedQParamsQuantizationSpec,
    FixedQParamsSpec,
    LearnableSlot,
    ObservedSlot,
    QParams,
    QuantizationSpec,
    Quantizer,
    Rule,
    RuleQuantizer,
    SharedQuantizationSpec,
    learnable_params,
    merge_learnable,
    quantize,
)
from jquant.transform.compare import compare
from jquant.transform.converter import convert
from jquant.transform.serialize import export_int_fn, load_exported, load_int_params, save_int_params

__all__ = [
    "convert",
    "export_int_fn",
    "kernels",
    "load_exported",
    "load_int_params",
    "save_int_params",
    "Annotation",
    "DerivedQuantizationSpec",
    "FixedQParamsQuantizationSpec",
    "FixedQParamsSpec",
    "QuantizationSpec",
    "Quantizer",
    "Rule",
    "RuleQuantizer",
    "LearnableSlot",
    "ObservedSlot",
    "QParams",
    "learnable_params",
    "merge_learnable",
    "SharedQuantizationSpec",
    "compare",
    "presets",
    "quantize",
    "FLOAT32_EPS",
    "QSCHEMES",
    "QTYPES",
    "choose_qparams",
    "dequantize_affine",
    "fake_quantize_affine",
    "fake_quantize_learnable_per_channel_affine",
    "fake_quantize_learnable_per_tensor_affine",
    "fake_quantize_per_channel_affine",
    "fake_quantize_per_tensor_affine",
    "pack_int4",
    "qrange",
    "quantize_affine",
    "unpack_int4",
    "observers",
    "FixedQParamsObserver",
    "HistogramObserver",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "MSEObserver",
    "PerChannelMinMaxObserver",
    "PercentileObserver",
    "PlaceholderObserver",
    "get_observer",
]
