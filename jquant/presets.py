"""Ready-made configs (tuples of ``Rule``) for the common recipes.

Every preset quantizes ``dot_general`` and ``conv_general_dilated`` sites and accepts ``exclude``: regular
expressions of site names to keep in float (they become leading all-None rules, so they win).
Weights always use symmetric per-output-channel qparams (zero point 0), which integer kernels need.
"""

from __future__ import annotations

from collections.abc import Sequence

from jquant.transform.specs import QuantizationSpec, Rule


def _excluded(exclude: Sequence[str]) -> tuple[Rule, ...]:
    if isinstance(exclude, str):
        exclude = (exclude,)
    return tuple(Rule(pattern=p) for p in exclude)


def int8_weight_spec(observer: str = "per_channel_minmax", fake_quant: str = "ste") -> QuantizationSpec:
    """Symmetric per-output-channel int8 weights over the full qint8 range -128..127 (as torch's qint8)."""
    return QuantizationSpec("int8", "per_channel_symmetric", observer=observer, fake_quant=fake_quant)


def int8_static(activation_dtype: str = "int8", exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """Static W8A8: per-channel symmetric int8 weights, per-tensor affine activations from calibration."""
    act = QuantizationSpec(activation_dtype, "per_tensor_affine", observer="minmax")
    return _excluded(exclude) + (Rule(weight=int8_weight_spec(), inputs=act),)


def int8_dynamic(exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """Dynamic W8A8: activation qparams computed per call from the tensor itself (no calibration needed)."""
    act = QuantizationSpec("int8", "per_tensor_affine", observer="minmax", is_dynamic=True)
    return _excluded(exclude) + (Rule(weight=int8_weight_spec(), inputs=act),)


def int8_weight_only(exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """Weight-only int8: activations stay float."""
    return _excluded(exclude) + (Rule(weight=int8_weight_spec()),)


def int4_weight_only(group_size: int = 128, exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """Weight-only int4, symmetric, one scale per ``group_size`` weights along the contraction dim."""
    weight = QuantizationSpec("int4", "per_channel_symmetric", observer="per_channel_minmax", block_size=group_size)
    return _excluded(exclude) + (Rule(weight=weight),)


def qat_int8(lsq: bool = False, activation_dtype: str = "int8", exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """QAT W8A8: moving-average activation observers (as torch's QAT defaults); ``lsq=True`` learns the qparams.

    With LSQ, run ``mode="calibrate"`` first to initialise the scales, then train them with
    ``jquant.transform.learnable_params`` / ``merge_learnable``.
    """
    fake_quant = "lsq" if lsq else "ste"
    act = QuantizationSpec(activation_dtype, "per_tensor_affine", observer="moving_average", fake_quant=fake_quant)
    return _excluded(exclude) + (Rule(weight=int8_weight_spec(fake_quant=fake_quant), inputs=act),)


def fp8(dtype: str = "float8_e4m3fn", exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """Float8 weights (per channel) and activations (per tensor), scale = absmax / finfo.max."""
    weight = QuantizationSpec(dtype, "per_channel_symmetric", observer="per_channel_minmax")
    act = QuantizationSpec(dtype, "per_tensor_symmetric", observer="minmax")
    return _excluded(exclude) + (Rule(weight=weight, inputs=act),)

