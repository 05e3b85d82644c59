"""A linen ``TrainState`` that carries the quantization state beside the params."""

from __future__ import annotations

from typing import Any

from flax import struct
from flax.training import train_state

from jquant.flax.schedule import QATSchedule, scheduled_apply


class QATTrainState(train_state.TrainState):
    """``TrainState`` + ``qstate`` (observer states and qparams) + the QAT schedule.

    ``apply_fn`` is the quantized function's ``apply``-compatible callable: ``scheduled_apply(params, *args)`` runs
    ``qfn`` in the phase the schedule gives for ``self.step`` and returns ``(out, new_qstate)``. Thread the
    new qstate back with ``apply_gradients(grads=..., qstate=new_qstate)``.
    """

    qstate: Any = None
    qfn: Any = struct.field(pytree_node=False, default=None)
    schedule: QATSchedule = struct.field(pytree_node=False, default=QATSchedule())

    def scheduled_apply(self, params: Any, *args: Any) -> tuple[Any, Any]:
        """Run the quantized model with ``params`` (the weights argument) at this state's step."""
        return scheduled_apply(self.qfn, self.qstate, self.step, params, *args, schedule=self.schedule)

    def eval_apply(self, params: Any, *args: Any) -> Any:
        """Fake-quant inference with frozen qparams (``mode="eval"``); returns the output only."""
        out, _ = self.qfn.apply(self.qstate, params, *args, mode="eval")
        return out

    @classmethod
    def create_qat(
        cls, *, qfn: Any, params: Any, tx: Any, example_args: tuple, schedule: QATSchedule | None = None, **kwargs: Any
    ) -> QATTrainState:
        """Build the state: ``qstate = qfn.init(params, *example_args)``."""
        qstate = qfn.init(params, *example_args)
        return cls.create(
            apply_fn=qfn.apply,
            params=params,
            tx=tx,
            qstate=qstate,
            qfn=qfn,
            schedule=schedule or QATSchedule(),
            **kwargs,
        )
