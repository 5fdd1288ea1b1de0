"""The adaptive attempt timeout: ``clamp(percentile x multiplier, min, attempt)`` of recent latencies.

Pure state over a ``LatencySketch`` (one per route and upstream); the
``AttemptTimeout`` policy asks ``current()`` at the start of every attempt
and arms its timer with the answer.  Below ``min_samples`` samples in the
window the fixed ``attempt`` is used: adapting from a handful of samples is
how a timeout gets clamped to its floor and kills legitimate slow calls.
The remaining deadline is applied by the policy, per request.

A retry after a cut-off waits twice as long as the try before it
(``current(attempt)``: the learned value x 2^(attempt-1), still capped at
``attempt``): when the upstream slows down for good, the learned value lags
the change for as long as the sketch needs to see it, and in that time a
too-tight timeout costs a retry, not the request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.config.types import AdaptiveTimeoutConfig
from proxy.policies.latency import LatencySketch

__all__ = ["AdaptiveTimeout"]


class AdaptiveTimeout:
    __slots__ = (
        "_attempt_s", "_gauge", "_gauge_factory", "_last", "_min", "_min_samples", "_multiplier", "_percentile",
        "sketch",
    )

    def __init__(self, config: AdaptiveTimeoutConfig, attempt_s: float, sketch: LatencySketch,
                 gauge: Callable[[], Any] | None = None) -> None:
        """``gauge()`` binds ``outrigger_adaptive_timeout_seconds{route,upstream}``: called on first use, so a
        reload that is then rejected shows no series."""
        if config.min > attempt_s:
            raise ValueError(f"adaptive.min ({config.min:g}s) is above attempt ({attempt_s:g}s)")
        self._percentile = config.percentile
        self._multiplier = config.multiplier
        self._min = float(config.min)
        self._min_samples = config.min_samples
        self._attempt_s = attempt_s
        self._gauge_factory = gauge
        self._gauge: Any = None
        self._last = -1.0
        self.sketch = sketch

    @property
    def learned(self) -> bool:
        """Enough samples in the window to use the learned value."""
        return self.sketch.count() >= self._min_samples

    def current(self, attempt: int = 1) -> float:
        """The timeout of the ``attempt``-th try starting now, in seconds (before the request's own deadline)."""
        value = self._attempt_s
        if self.sketch.count() >= self._min_samples:
            quantile = self.sketch.quantile(self._percentile)
            if quantile is not None:
                value = min(self._attempt_s, max(self._min, quantile * self._multiplier))
        if value != self._last:
            self._last = value
            if self._gauge is None and self._gauge_factory is not None:
                self._gauge = self._gauge_factory()
            if self._gauge is not None:
                self._gauge.set(value)  # the first try's value: the learned one
        if attempt > 1 and value < self._attempt_s:
            value = min(self._attempt_s, value * 2.0 ** min(attempt - 1, 16))
        return value

    def snapshot(self) -> dict[str, Any]:
        return {"timeout_s": round(self.current(), 6), "learned": self.learned, "samples": self.sketch.count(),
                "percentile": self._percentile,
                "observed_s": _round(self.sketch.quantile(self._percentile))}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
