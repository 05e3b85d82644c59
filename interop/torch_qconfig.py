"""The torch eager-mode QAT ``QConfig`` whose numerics match jquant's int8 presets."""

from __future__ import annotations

from typing import Any

from interop._torch import require_torch


def torch_qat_qconfig() -> Any:
    """``QConfig`` for torch's ``prepare_qat`` matching ``jquant.presets.qat_int8(activation_dtype="uint8")``.

    Activations: quint8 per-tensor affine over the full 0..255 range (torch's x86 default reduces the range
    to 0..127); weights: qint8 per-channel symmetric -128..127; moving-average min/max observers (c = 0.01) on
    both, as jquant's QAT preset. A model prepared with it takes ``interop.export_qparams`` output as is, and
    its ``convert`` runs on torch's x86 int8 kernels.
    """
    torch = require_torch("torch_qat_qconfig")
    from torch.ao import quantization as tq

    return tq.QConfig(
        activation=tq.FakeQuantize.with_args(
            observer=tq.MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
        ),
        weight=tq.FakeQuantize.with_args(
            observer=tq.MovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
        ),
    )
