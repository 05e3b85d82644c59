"""Pure observers: ``init(x) -> state``, ``update(state, x) -> state``, ``calculate_qparams(state)``.

Observers are immutable, hashable configurations (torch's class names, arguments and defaults where torch
has the class); states are pytrees that work under ``jit`` and ``vmap``. Freezing an observer means not
calling ``update``. ``get_observer("minmax", dtype="qint8")`` builds one from a short name.

Sharded data: ``merge(state, axis_names, previous=None) -> state`` combines per-shard states inside
``shard_map`` (each shard updated the replicated ``previous`` with its own block) into one replicated state:
``pmin``/``pmax`` of ranges (exact for min/max, moving averages and the placeholder), per-block ranges for
percentile / MSE, and ``psum`` of histogram counts re-binned onto the global range.
"""

from jquant.observers._base import MinMaxState
from jquant.observers.fixed import FixedQParamsObserver, PlaceholderObserver
from jquant.observers.histogram import HistogramObserver, HistogramState
from jquant.observers.minmax import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)
from jquant.observers.mse import MSEObserver
from jquant.observers.percentile import PercentileObserver
from jquant.observers.registry import OBSERVERS, get_observer

__all__ = [
    "OBSERVERS",
    "FixedQParamsObserver",
    "HistogramObserver",
    "HistogramState",
    "MSEObserver",
    "MinMaxObserver",
    "MinMaxState",
    "MovingAverageMinMaxObserver",
    "MovingAveragePerChannelMinMaxObserver",
    "PerChannelMinMaxObserver",
    "PercentileObserver",
    "PlaceholderObserver",
    "get_observer",
]
