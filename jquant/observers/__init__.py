"""Pure observers: ``init(x) -> state``, ``update(state, x) -> state``, ``calculate_qparams(state)``."""

from jquant.observers._base import MinMaxState
from jquant.observers.minmax import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)

__all__ = [
    "MinMaxObserver",
    "MinMaxState",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "PerChannelMinMaxObserver",
]
