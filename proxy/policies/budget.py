"""The retry budget: caps retries at a fraction of recent traffic so they cannot storm.

Linkerd/Finagle design: over a sliding window, a retry may go when
``retries + 1 <= ratio * requests + min_per_second * window_s``.  The ratio
bounds the extra load retries add (0.2 = at most 20% more requests); the
per-second floor lets a quiet route still retry at all.  The retry policy
calls ``record_request`` once per original request and ``try_withdraw`` before
each retry; ``remaining`` feeds ``/status``.  Pure state, no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

from proxy.argument_checks import finite_non_negative, finite_positive
from proxy.clock import Clock
from proxy.config.types import BudgetConfig
from proxy.policies.window import RollingCounter

__all__ = ["RetryBudget"]

# ratio*requests is float arithmetic (0.57*100 == 56.99999999999999); without this slack a
# budget that is exactly spent on paper would refuse its last retry.
_EPSILON: Final = 1e-9


class RetryBudget:
    __slots__ = ("_floor", "_requests", "_retries", "min_per_second", "ratio", "window_s")

    def __init__(self, ratio: float, min_per_second: float, window_s: float, clock: Clock) -> None:
        self.ratio = finite_non_negative("ratio", ratio)
        self.min_per_second = finite_non_negative("min_per_second", min_per_second)
        self.window_s = finite_positive("window_s", window_s)
        # The floor is constant, so it is computed once rather than on every withdrawal.
        self._floor = self.min_per_second * self.window_s
        # Requests may leave the window early (less allowance) but retries must never: a retry
        # forgotten before window_s is up would let the floor be spent twice within one window.
        self._requests = RollingCounter(window_s, clock)
        self._retries = _RetryLog(window_s, clock)

    @classmethod
    def from_config(cls, cfg: BudgetConfig, clock: Clock) -> RetryBudget:
        return cls(cfg.ratio, cfg.min_per_second, cfg.window, clock)

    def _headroom(self) -> float:
        return self.ratio * self._requests.total() + self._floor - self._retries.total() + _EPSILON

    def record_request(self) -> None:
        """Count one original request (not a retry) towards the allowance."""
        self._requests.add()

    def try_withdraw(self) -> bool:
        """Ask to send one retry; when allowed, the retry is recorded against the budget."""
        if self._headroom() < 1.0:
            return False
        self._retries.add()
        return True

    def remaining(self) -> float:
        """How many more retries ``try_withdraw`` would allow right now (>= 0)."""
        return float(max(0, math.floor(self._headroom())))


class _RetryLog:
    """Retries sent in the window; each is counted for at least ``window_s`` (never expired early).

    ``RollingCounter`` drops a bucket as a whole, so an event may be forgotten up to one bucket
    width before ``window_s`` has passed: right for requests (the allowance only shrinks), wrong
    for retries.  Here retries are grouped into slices of ``window_s / buckets`` and a slice is
    dropped once its *newest* retry is ``window_s`` old, so a retry counts for between
    ``window_s`` and ``window_s`` plus one slice.  At most ``buckets + 1`` slices are kept, and
    ``add``/``total`` are O(1) amortised, allocating one small list per slice, not per retry.
    """

    __slots__ = ("_clock", "_slices", "_total", "_width", "window_s")

    def __init__(self, window_s: float, clock: Clock, buckets: int = 10) -> None:
        self.window_s = window_s
        self._clock = clock
        self._width = window_s / buckets
        self._slices: deque[list[float]] = deque()  # [slice index, count, newest time]
        self._total = 0.0

    def _expire(self, now: float) -> None:
        cutoff = now - self.window_s
        slices = self._slices
        while slices and slices[0][2] <= cutoff:
            self._total -= slices.popleft()[1]

    def add(self) -> None:
        now = self._clock.now()
        self._expire(now)
        index = now // self._width
        slices = self._slices
        if slices and slices[-1][0] >= index:  # same slice (or a clock that stepped back)
            newest = slices[-1]
            newest[1] += 1.0
            newest[2] = now if now > newest[2] else newest[2]
        else:
            slices.append([index, 1.0, now])
        self._total += 1.0

    def total(self) -> float:
        self._expire(self._clock.now())
        return self._total if self._total > 0.0 else 0.0
