"""Lazy access to the optional torch dependency."""

from __future__ import annotations

from types import ModuleType


def require_torch(feature: str = "this interop feature") -> ModuleType:
    """Import torch, or raise ImportError telling the user how to install it."""
    try:
        import torch
    except ImportError as err:  # pragma: no cover - torch is installed in the test environment
        raise ImportError(
            f"{feature} needs PyTorch, which is not installed; install it with `pip install jquant[torch]`"
        ) from err
    return torch


def require_safetensors(feature: str = "reading safetensors files") -> ModuleType:
    """Import the safetensors package, or raise ImportError with the install command."""
    try:
        import safetensors
    except ImportError as err:  # pragma: no cover
        raise ImportError(
            f"{feature} needs the `safetensors` package; install it with `pip install jquant[torch]`"
        ) from err
    return safetensors
