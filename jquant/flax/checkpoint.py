"""Checkpoint params + qstate + optimizer state with orbax, so a QAT run resumes bit-exactly."""

from __future__ import annotations

import os
from typing import Any

import jax


def save_checkpoint(path: str | os.PathLike, state: Any) -> None:
    """Write the pytree ``state`` (e.g. a ``QATTrainState``) to the directory ``path`` (must not exist)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"path: {path} already exists; choose a new directory per checkpoint")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state)


def restore_checkpoint(path: str | os.PathLike, like: Any) -> Any:
    """Read a checkpoint into the structure, shapes and dtypes of ``like`` (a freshly built state)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: no checkpoint directory at {path}")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "shape") else x, like)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, abstract)
