"""QAT for Flax nnx: a wrapper module that keeps the qstate in an nnx Variable collection beside the params."""

from __future__ import annotations

import functools
from typing import Any

from flax import nnx

from jquant.flax.schedule import MODES


class QState(nnx.Variable):
    """jquant's quantization state (observer states and qparams). Not an ``nnx.Param``: optimizers skip it."""


class QATModule(nnx.Module):
    """Wrap an nnx model so that calling it runs ``jquant.quantize`` of the model.

    ``QATModule(model, *example_args, config=...)`` traces the model and stores the qstate as a ``QState``
    variable. Calling it runs the quantized model in ``self.mode`` ("calibrate", "qat" or "eval") and writes
    the new qstate and any updated model state (e.g. BatchNorm statistics) back, so it trains with
    ``nnx.Optimizer(wrapper, tx, wrt=nnx.Param)`` and ``nnx.value_and_grad`` like the bare model.
    ``model.eval()`` / ``model.train()`` keep working: each graph definition gets its own trace.
    """

    def __init__(self, model: nnx.Module, *example_args: Any, config: Any = None, mode: str = "qat"):
        from jquant.transform.specs import normalize_config

        self.model = model
        self.mode = _check_mode(mode)
        self.rules = normalize_config(config)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        self.qstate = QState(self.quantized.init(params, rest, *example_args))

    @property
    def quantized(self) -> Any:
        """The ``QuantizedFunction`` of the model's current graph definition, ``(params, rest, *args)``."""
        graphdef, _, _ = nnx.split(self.model, nnx.Param, ...)
        return _quantized_model(graphdef, self.rules)

    def set_mode(self, mode: str) -> None:
        """Switch between "calibrate", "qat" and "eval" (like ``model.train()`` / ``model.eval()``)."""
        self.mode = _check_mode(mode)

    def __call__(self, *args: Any) -> Any:
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        quantized = _quantized_model(graphdef, self.rules)
        (out, new_rest), new_qstate = quantized.apply(_get(self.qstate), params, rest, *args, mode=self.mode)
        nnx.update(self.model, new_rest)
        _set(self.qstate, new_qstate)
        return out


# flax >= 0.12 deprecates ``Variable.value`` for get_value / set_value; older flax has only ``.value``.
def _get(variable: nnx.Variable) -> Any:
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _set(variable: nnx.Variable, value: Any) -> None:
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


@functools.lru_cache(maxsize=64)
def _quantized_model(graphdef: Any, rules: tuple) -> Any:
    from jquant.transform import quantize

    def model_function(params: Any, rest: Any, *args: Any) -> tuple[Any, Any]:
        model = nnx.merge(graphdef, params, rest)
        out = model(*args)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return out, new_rest

    return quantize(model_function, list(rules))


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return mode
