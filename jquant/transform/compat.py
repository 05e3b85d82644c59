"""The one place jquant reaches into private jax APIs; each use has a safe fallback.

Public equivalents are used everywhere else (``jax.extend.core``, ``jax.extend.source_info_util``,
``jax.extend.core.primitives``). Tested with jax 0.10 (see ``pyproject.toml``).
"""

from __future__ import annotations

from typing import Any

from jax.extend.core import Jaxpr


def used_inputs(jaxpr: Jaxpr) -> list[bool]:
    """Which inputs of ``jaxpr`` its outputs depend on (dead-code elimination of every output).

    Fallback when jax's DCE moved: every input counts as used. That is the safe answer for the converter,
    which keeps a float weight leaf whenever it may still be read (e.g. a tied embedding).
    """
    try:
        from jax._src.interpreters.partial_eval import dce_jaxpr
    except ImportError:
        return [True] * len(jaxpr.invars)
    _, used = dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
    return list(used)


def shard_map_primitive() -> Any:
    """The ``shard_map`` primitive object (not exported by ``jax.extend.core.primitives``), or None."""
    try:
        from jax._src.shard_map import shard_map_p
    except ImportError:
        return None
    return shard_map_p
