"""Conv + BatchNorm with the BN scale folded into the conv weight, for QAT (torch's ``ConvBn2d`` QAT recipe).

The conv runs on ``kernel * gamma / sqrt(running_var + eps)``: this folded kernel is what ``jquant.quantize``
observes and fake-quantizes (its weight data flow starts at the params), so QAT sees the weight that
inference will use. The conv output is divided by the same factor and normalised with the batch statistics
while training, as torch does, so BN still trains. ``freeze_bn`` (may be a traced bool, e.g.
``step >= n``) switches to the running statistics and stops updating them. After training, the folded
kernel and ``bias = beta - gamma * mean / std`` are exactly the fused conv that ``jquant.convert`` quantizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class ConvBN(nn.Module):
    """``nn.Conv`` (no bias) followed by ``nn.BatchNorm``, folded for quantization-aware training.

    Parameters live under ``kernel`` (HWIO), ``scale``/``bias`` (BN gamma/beta) and ``batch_stats``
    ``mean``/``var``. ``momentum`` follows Flax (0.9 == torch's 0.1); the running variance is updated with the
    unbiased batch variance, as torch does (Flax's ``BatchNorm`` uses the biased one).
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    padding: Any = "SAME"
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, freeze_bn: Any = False) -> jnp.ndarray:
        in_features = x.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (*self.kernel_size, in_features, self.features), jnp.float32
        )
        gamma = self.param("scale", nn.initializers.ones, (self.features,), jnp.float32)
        beta = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,), jnp.float32)
        var = self.variable("batch_stats", "var", jnp.ones, (self.features,), jnp.float32)

        factor = gamma * lax.rsqrt(var.value + self.epsilon)
        conv = lax.conv_general_dilated(
            x,
            kernel * factor,
            window_strides=tuple(self.strides or (1,) * len(self.kernel_size)),
            padding=self.padding,
            dimension_numbers=_channels_last(len(self.kernel_size)),
        )
        if not train:
            # Inference: the fused conv (folded kernel + folded bias), what convert turns into an int8 conv.
            return conv + (beta - factor * mean.value)
        unscaled = conv / factor
        axes = tuple(range(unscaled.ndim - 1))
        batch_mean = unscaled.mean(axes)
        batch_var = unscaled.var(axes)
        frozen = jnp.asarray(freeze_bn)
        use_mean = jnp.where(frozen, mean.value, batch_mean)
        use_var = jnp.where(frozen, var.value, batch_var)
        if not self.is_initializing():
            n = unscaled.size / unscaled.shape[-1]
            unbiased = batch_var * n / max(n - 1, 1)
            mean.value = jnp.where(frozen, mean.value, self.momentum * mean.value + (1 - self.momentum) * batch_mean)
            var.value = jnp.where(frozen, var.value, self.momentum * var.value + (1 - self.momentum) * unbiased)
        return (unscaled - use_mean) * (gamma * lax.rsqrt(use_var + self.epsilon)) + beta


def _channels_last(spatial_dims: int) -> tuple[str, str, str]:
    letters = "DHW"[-spatial_dims:] if spatial_dims <= 3 else None
    if letters is None:
        raise ValueError(f"kernel_size: ConvBN supports 1 to 3 spatial dims, got {spatial_dims}")
    return f"N{letters}C", f"{letters}IO", f"N{letters}C"


def fold_conv_bn(params: dict, batch_stats: dict, epsilon: float = 1e-5) -> dict:
    """The fused conv of one ``ConvBN``: ``{"kernel": kernel * gamma / std, "bias": beta - gamma * mean / std}``.

    ``params`` / ``batch_stats`` are the module's own collections (``kernel``, ``scale``, ``bias`` and
    ``mean``, ``var``). This is the conv that ``ConvBN`` runs at inference and that torch's converted
    ``ConvBn2d`` holds.
    """
    factor = params["scale"] * lax.rsqrt(batch_stats["var"] + epsilon)
    return {"kernel": params["kernel"] * factor, "bias": params["bias"] - factor * batch_stats["mean"]}
