"""jquant: quantization for JAX with PyTorch-exact numerics."""

from jquant.numerics.qparams import FLOAT32_EPS, choose_qparams
from jquant.numerics.qschemes import QSCHEMES
from jquant.numerics.qtypes import QTYPES, qrange

__all__ = ["FLOAT32_EPS", "QSCHEMES", "QTYPES", "choose_qparams", "qrange"]
