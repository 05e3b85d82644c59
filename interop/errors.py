"""Errors raised by the interop package: all are ValueError subclasses so callers can catch broadly."""

from __future__ import annotations


class InteropError(ValueError):
    """Base class of every interop error."""


class CheckpointError(InteropError):
    """A checkpoint file cannot be read or written (missing, truncated, corrupted, unsafe)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint needs a global that ``torch.load(weights_only=True)`` refuses to import."""


class MappingError(InteropError):
    """Parameters could not be matched between a torch state_dict and a JAX pytree."""
