"""Short names for observers, so configurations can name calibration by a string (qwix style)."""

from __future__ import annotations

from typing import Any

from jquant.observers.fixed import FixedQParamsObserver, PlaceholderObserver
from jquant.observers.histogram import HistogramObserver
from jquant.observers.minmax import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)
from jquant.observers.mse import MSEObserver
from jquant.observers.percentile import PercentileObserver

OBSERVERS: dict[str, type] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "per_channel_minmax": PerChannelMinMaxObserver,
    "moving_average_per_channel": MovingAveragePerChannelMinMaxObserver,
    "histogram": HistogramObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "fixed": FixedQParamsObserver,
    "placeholder": PlaceholderObserver,
}


def get_observer(name: str, **kwargs: Any) -> Any:
    """Build an observer from a short name (``"minmax"``, ``"histogram"``, ...) or its class name.

    Keyword arguments go to the observer's constructor, e.g. ``get_observer("minmax", dtype="qint8")``.
    """
    by_class_name = {cls.__name__: cls for cls in OBSERVERS.values()}
    cls = OBSERVERS.get(name) or by_class_name.get(name)
    if cls is None:
        raise ValueError(f"get_observer: unknown observer {name!r}; allowed: {', '.join(OBSERVERS)}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"get_observer({name!r}): {err}") from None
