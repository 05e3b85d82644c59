"""Quantization schemes, named as in torch (``torch.per_tensor_affine`` -> ``"per_tensor_affine"``)."""

from __future__ import annotations

QSCHEMES = (
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
)


def canonical_qscheme(qscheme: object) -> str:
    """Accept ``"per_tensor_affine"``, ``"torch.per_tensor_affine"`` or a torch qscheme object."""
    name = str(qscheme).removeprefix("torch.")
    if name not in QSCHEMES:
        raise ValueError(f"qscheme: unknown qscheme {qscheme!r}; allowed: {', '.join(QSCHEMES)}")
    return name


def is_symmetric(qscheme: str) -> bool:
    return canonical_qscheme(qscheme) in ("per_tensor_symmetric", "per_channel_symmetric")


def is_per_channel(qscheme: str) -> bool:
    return canonical_qscheme(qscheme).startswith("per_channel")
