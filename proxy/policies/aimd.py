"""The adaptive concurrency limit: AIMD, a loss-based limiter for the client side.

Pure state on the injected clock; the bulkhead owns one per upstream (with
``concurrency.adaptive``) and admits attempts up to ``limit`` instead of
``max_active``.  Additive increase: +1 per window of ``limit`` successes,
counted only while at least half the limit is in use, so an
idle upstream does not talk the limit up to a ceiling it never tested.
Multiplicative decrease: a drop (timeout, connect failure, 503, 429)
multiplies the limit by ``decrease_ratio``, at most once per congestion
event: drops of attempts that started before the last decrease reflect the
old limit and are not counted again (as TCP reacts once per round trip).
The limit stays within ``[min, max_active]``.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.clock import Clock
from proxy.config.types import AdaptiveConcurrencyConfig

__all__ = ["AimdLimit"]


class AimdLimit:
    __slots__ = ("_clock", "_credit", "_decreased_at", "_limit", "_max", "_min", "_on_change", "_ratio", "limit")

    def __init__(self, config: AdaptiveConcurrencyConfig, max_active: int, clock: Clock,
                 on_change: Callable[[int], None] | None = None) -> None:
        if not config.min <= config.initial <= max_active:
            raise ValueError(f"need min <= initial <= max_active, got {config.min}, {config.initial}, {max_active}")
        if not 0.0 < config.decrease_ratio < 1.0:
            raise ValueError(f"decrease_ratio must be in (0, 1), got {config.decrease_ratio!r}")
        self._min = config.min
        self._max = max_active
        self._ratio = config.decrease_ratio
        self._clock = clock
        self._on_change = on_change
        self._limit = float(config.initial)
        self._decreased_at = -float("inf")
        self._credit = 0  # successes towards the next +1
        self.limit = config.initial  # whole attempts admitted at once

    def _set(self, value: float) -> None:
        self._limit = min(float(self._max), max(float(self._min), value))
        limit = int(self._limit)
        if limit != self.limit:
            self.limit = limit
            if self._on_change is not None:
                self._on_change(limit)

    def on_success(self, inflight: int) -> None:
        """An attempt answered; ``inflight`` attempts were running when it did."""
        if inflight * 2 >= self.limit:
            self._credit += 1
            if self._credit >= self.limit:
                self._credit = 0
                self._set(self._limit + 1.0)

    def on_drop(self, started_at: float) -> None:
        """An attempt that started at ``started_at`` (clock time) was dropped: timeout, connect failure, 503, 429."""
        if started_at < self._decreased_at:
            return  # sent under the limit we already cut
        self._decreased_at = self._clock.now()
        self._credit = 0
        self._set(self._limit * self._ratio)

    def snapshot(self) -> dict[str, float | int]:
        return {"limit": self.limit, "min": self._min, "max": self._max}
