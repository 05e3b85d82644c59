"""Pure observers: ``init(x) -> state``, ``update(state, x) -> state``, ``calculate_qparams(state)``."""

from jquant.observers._base import MinMaxState
from jquant.observers.histogram import HistogramObserver, HistogramState
from jquant.observers.minmax import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)

__all__ = [
    "HistogramObserver",
    "HistogramState",
    "MinMaxObserver",
    "MinMaxState",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "PerChannelMinMaxObserver",
]
