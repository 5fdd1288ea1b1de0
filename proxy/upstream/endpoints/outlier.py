"""Outlier detection: when one endpoint of an upstream is failing, take it out for a while.

Pure logic on an injected clock.  Each endpoint has an ``OutlierTracker``;
``OutlierDetector.record`` counts an attempt's outcome and says whether (and
why) the endpoint has earned an ejection, and ``may_eject`` applies the
set-wide caps: at most ``max_ejected_percent`` of the endpoints out at once,
and never the last one still in service.  So, unlike Envoy's default 10%,
one bad endpoint out of two to nine is ejected, and a single-endpoint
upstream never is (its breaker is what protects it).

Ejection lasts ``base_ejection x n`` (n = ejections so far, capped at
``max_ejection``).  After ``max_ejection`` without a new ejection the
multiplier starts over.  Failures are connect failures, resets, timeouts and
502/503/504 answers.
"""

from __future__ import annotations

from proxy.clock import Clock
from proxy.config.types import OutlierDetectionConfig
from proxy.policies.window import RateWindow

__all__ = ["OutlierDetector", "OutlierTracker"]


class OutlierTracker:
    """One endpoint's failure counts and ejection history."""

    __slots__ = ("consecutive", "ejected_at", "ejected_until", "ejections", "window")

    def __init__(self, window: RateWindow | None) -> None:
        self.consecutive = 0
        self.window = window
        self.ejections = 0
        self.ejected_at = 0.0
        self.ejected_until = 0.0

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now


class OutlierDetector:
    __slots__ = ("_clock", "config")

    def __init__(self, config: OutlierDetectionConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock

    def tracker(self) -> OutlierTracker:
        rate = self.config.failure_rate
        return OutlierTracker(RateWindow(rate.window, self._clock) if rate is not None else None)

    def record(self, tracker: OutlierTracker, failure: bool) -> str | None:
        """Count one attempt's outcome; the ejection reason it now deserves, if any."""
        if failure:
            tracker.consecutive += 1
        else:
            tracker.consecutive = 0
        window = tracker.window
        if window is not None:
            window.add(failure)
        if not failure:
            return None
        if tracker.consecutive >= self.config.consecutive_failures:
            return "consecutive_failures"
        rate = self.config.failure_rate
        if window is not None and rate is not None and window.exceeds(rate.threshold, rate.min_requests):
            return "failure_rate"
        return None

    def may_eject(self, ejected: int, total: int) -> bool:
        """Whether one more of ``total`` endpoints may go out while ``ejected`` already are."""
        if total - ejected <= 1:
            return False  # never the last endpoint in service
        return (ejected + 1) * 100 <= self.config.max_ejected_percent * total

    def eject(self, tracker: OutlierTracker) -> float:
        """Take the endpoint out; how long for, in seconds."""
        config = self.config
        now = self._clock.now()
        if tracker.ejections and now - tracker.ejected_at >= config.max_ejection + config.base_ejection:
            tracker.ejections = 0  # well-behaved for long enough: the multiplier starts over
        tracker.ejections += 1
        duration = min(config.base_ejection * tracker.ejections, config.max_ejection)
        tracker.ejected_at = now
        tracker.ejected_until = now + duration
        tracker.consecutive = 0
        if tracker.window is not None:
            tracker.window.clear()
        return duration
