"""Step-based QAT schedule: float warm-up, fake-quant training, then frozen observers.

torch's QAT recipe toggles ``disable_fake_quant`` / ``disable_observer`` on modules; here the phase is a
pure function of the (traced) step, so one jitted train step serves the whole run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax

from jquant.transform.handler import MODES


@dataclasses.dataclass(frozen=True)
class QATSchedule:
    """When fake quant starts and when observers freeze.

    Args:
      fake_quant_start: steps before this run the float model while observers calibrate (``mode="calibrate"``).
      observer_freeze: from this step on, qparams are frozen: fake quant with the current qparams and
        straight-through gradients, qstate unchanged (``mode="eval"``). None: never freeze.
    """

    fake_quant_start: int = 0
    observer_freeze: int | None = None

    def __post_init__(self) -> None:
        if self.fake_quant_start < 0:
            raise ValueError(f"fake_quant_start: must be >= 0, got {self.fake_quant_start}")
        if self.observer_freeze is not None and self.observer_freeze < self.fake_quant_start:
            raise ValueError(
                f"observer_freeze ({self.observer_freeze}) must not come before fake_quant_start "
                f"({self.fake_quant_start})"
            )

    def phase(self, step: Any) -> jnp.ndarray:
        """Index into ``MODES`` for ``step`` (works on traced steps)."""
        step = jnp.asarray(step)
        index = jnp.where(step < self.fake_quant_start, 0, 1)
        if self.observer_freeze is not None:
            index = jnp.where(step >= self.observer_freeze, 2, index)
        return index


def scheduled_apply(qf: Any, qstate: Any, step: Any, *args: Any, schedule: QATSchedule) -> tuple[Any, Any]:
    """``qf.apply(qstate, *args, mode=...)`` with the mode chosen by ``schedule`` at ``step`` (jit-friendly)."""
    branches = [lambda qs, a, mode=mode: qf.apply(qs, *a, mode=mode) for mode in MODES]
    return lax.switch(schedule.phase(step), branches, qstate, args)
