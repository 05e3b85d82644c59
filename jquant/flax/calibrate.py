"""Post-training calibration: run batches through the float model while observers record statistics."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax


def calibrate(
    qf: Any,
    qstate: Any,
    batches: Iterable[tuple],
    *,
    progress: bool = True,
    total: int | None = None,
    desc: str = "calibrate",
) -> Any:
    """Feed each ``args`` tuple in ``batches`` to ``qf.apply(qstate, *args, mode="calibrate")``; return the qstate.

    The apply is jitted once. With ``progress`` a tqdm bar is shown when tqdm is installed.
    """
    step = jax.jit(lambda qs, args: qf.apply(qs, *args, mode="calibrate")[1])
    iterator = batches
    if progress:
        try:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, total=total, desc=desc, leave=False)
        except ImportError:  # tqdm is optional
            pass
    for args in iterator:
        if not isinstance(args, tuple):
            raise TypeError(
                f"batches: each item must be a tuple of arguments for the function, got {type(args).__name__}"
            )
        qstate = step(qstate, args)
    return qstate
