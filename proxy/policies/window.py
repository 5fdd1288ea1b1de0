"""Sliding-window counting for the policies that judge "the last N seconds".

``RollingCounter`` backs the retry budget (requests and retries in the window)
and the circuit breaker's failure-rate and slow-call windows.  It is a fixed
ring of buckets with a running total, so ``add`` and ``total`` are O(1)
amortised and allocate nothing: the hot path never scans a history list.

Granularity: time is cut into ``buckets`` slots of ``window_s / buckets``
seconds.  An event stays counted for at least ``window_s - window_s/buckets``
and at most ``window_s`` seconds; it is never counted for longer than the window.
"""

from __future__ import annotations

from proxy.argument_checks import at_least_one, finite_positive
from proxy.clock import Clock

__all__ = ["RateWindow", "RollingCounter"]


class RollingCounter:
    """Sum of the amounts ``add``-ed during (roughly) the last ``window_s`` seconds."""

    __slots__ = ("_clock", "_counts", "_head", "_n", "_total", "_width", "_zeros", "window_s")

    def __init__(self, window_s: float, clock: Clock, buckets: int = 10) -> None:
        self.window_s = finite_positive("window_s", window_s)
        at_least_one("buckets", buckets)
        self._clock = clock
        self._n = buckets
        self._width = self.window_s / buckets
        self._counts = [0.0] * buckets
        # Kept so that a full reset is a slice copy rather than a fresh list per reset.
        self._zeros = [0.0] * buckets
        self._total = 0.0
        # Absolute index (now // width) of the newest bucket; the slot is index % n.
        self._head = self._index()

    def _index(self) -> int:
        return int(self._clock.now() // self._width)

    def _advance(self) -> None:
        idx = self._index()
        steps = idx - self._head
        if steps <= 0:
            # Same bucket, or a clock that stepped backwards: never un-expire data.
            return
        if steps >= self._n:
            # A jump longer than the window expires everything: O(buckets), not O(jump).
            self._counts[:] = self._zeros
            self._total = 0.0
        else:
            counts, n = self._counts, self._n
            for i in range(self._head + 1, idx + 1):
                slot = i % n
                self._total -= counts[slot]
                counts[slot] = 0.0
        self._head = idx

    def add(self, n: float = 1.0) -> None:
        """Count ``n`` at the current time."""
        self._advance()
        self._counts[self._head % self._n] += n
        self._total += n

    def total(self) -> float:
        """Sum over the window, with expired buckets dropped."""
        self._advance()
        # Subtracting fractional amounts can leave a -1e-17 residue; a count is never negative.
        return self._total if self._total > 0.0 else 0.0

    def clear(self) -> None:
        """Forget everything (the breaker does this when it closes)."""
        self._counts[:] = self._zeros
        self._total = 0.0
        self._head = self._index()


class RateWindow:
    """Hits out of a total over a sliding window: the breaker's failure-rate and slow-call windows."""

    __slots__ = ("_hits", "_total")

    def __init__(self, window_s: float, clock: Clock, buckets: int = 10) -> None:
        self._total = RollingCounter(window_s, clock, buckets)
        self._hits = RollingCounter(window_s, clock, buckets)

    def add(self, hit: bool) -> None:
        self._total.add()
        if hit:
            self._hits.add()

    def counts(self) -> tuple[float, float]:
        """``(hits, total)`` over the window."""
        return self._hits.total(), self._total.total()

    def exceeds(self, threshold: float, min_requests: int) -> bool:
        """True once at least ``min_requests`` were seen and hits/total >= threshold."""
        total = self._total.total()
        return total >= min_requests and self._hits.total() >= threshold * total

    def snapshot(self, hits_name: str) -> dict[str, float]:
        hits, total = self.counts()
        return {hits_name: hits, "total": total, "rate": hits / total if total else 0.0}

    def clear(self) -> None:
        self._total.clear()
        self._hits.clear()
