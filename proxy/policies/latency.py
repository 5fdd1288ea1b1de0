"""The latency sketch: recent attempt latencies of one route and upstream, as quantiles.

Feeds the adaptive attempt timeout and the hedge delay (``auto``).  One sketch
exists per route and upstream (built in ``proxy.app``), keyed so that a
per-endpoint sketch can be added when upstreams get several endpoints.

A windowed log-bucket histogram (the DDSketch mapping, without the library):
a latency ``v`` falls in bucket ``ceil(log(v) / log(gamma))``, so every bucket
spans ``gamma`` (1.02 = about 1% relative error) and a quantile is exact to
that error whatever the spread.  The window is cut into ``slots`` sub-windows;
the oldest is dropped whole as time moves on, so a sample counts for between
``window - window/slots`` and ``window`` seconds.  A running total over the
live sub-windows keeps ``add`` O(1); ``quantile`` walks the occupied buckets
(a few hundred at most) and is cached until the window rotates or the count
moves by more than 1/32, so the per-request path costs a dict update.  Pure:
time comes from the injected clock.  Why not ``ddsketch``/``fastdigest``:
see docs/adaptive.md (insert cost measured there).
"""

from __future__ import annotations

import math

from proxy.argument_checks import finite_positive
from proxy.clock import Clock

__all__ = ["LatencySketch"]

_GAMMA = 1.02
_LOG_GAMMA = math.log(_GAMMA)
_FLOOR_S = 1e-6  # latencies below a microsecond share one bucket


class LatencySketch:
    __slots__ = ("_cache", "_clock", "_count", "_head", "_slots", "_total", "_width", "window_s")

    def __init__(self, window_s: float, clock: Clock, slots: int = 6) -> None:
        finite_positive("window_s", window_s)
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots!r}")
        self.window_s = float(window_s)
        self._clock = clock
        self._width = self.window_s / slots
        self._slots: list[dict[int, int]] = [{} for _ in range(slots)]
        self._total: dict[int, int] = {}
        self._count = 0
        self._head = int(clock.now() // self._width)
        self._cache: dict[float, tuple[int, int, float]] = {}  # q -> (head, count, value)

    def _advance(self) -> None:
        index = int(self._clock.now() // self._width)
        steps = index - self._head
        if steps <= 0:
            return  # same sub-window, or a clock that stepped back
        slots, n = self._slots, len(self._slots)
        if steps >= n:
            for slot in slots:
                slot.clear()
            self._total.clear()
            self._count = 0
        else:
            total = self._total
            for i in range(self._head + 1, index + 1):
                slot = slots[i % n]
                for bucket, hits in slot.items():
                    left = total[bucket] - hits
                    if left:
                        total[bucket] = left
                    else:
                        del total[bucket]
                    self._count -= hits
                slot.clear()
        self._head = index

    def add(self, seconds: float, *, censored: bool = False) -> None:
        """Record one latency (seconds); ``censored``: only a lower bound (the attempt was cut off at it),
        which also drops the cached quantiles, as it says the learned value may be too tight."""
        self._advance()
        if censored:
            self._cache.clear()
        bucket = math.ceil(math.log(seconds if seconds > _FLOOR_S else _FLOOR_S) / _LOG_GAMMA)
        slot = self._slots[self._head % len(self._slots)]
        slot[bucket] = slot.get(bucket, 0) + 1
        self._total[bucket] = self._total.get(bucket, 0) + 1
        self._count += 1

    def count(self) -> int:
        """Samples in the window."""
        self._advance()
        return self._count

    def quantile(self, percentile: float) -> float | None:
        """The ``percentile`` (0-100) latency over the window in seconds; None when empty."""
        self._advance()
        count = self._count
        if not count:
            return None
        cached = self._cache.get(percentile)
        if cached is not None and cached[0] == self._head and abs(count - cached[1]) * 32 <= cached[1]:
            return cached[2]
        rank = math.ceil(percentile / 100.0 * count) - 1  # nearest rank, 0-based: never below the percentile
        seen = 0
        value = 0.0
        for bucket in sorted(self._total):
            seen += self._total[bucket]
            if seen > rank:
                # The bucket's midpoint (in log space) is within gamma's relative error of any value in it.
                value = 2.0 * _GAMMA ** bucket / (1.0 + _GAMMA)
                break
        self._cache[percentile] = (self._head, count, value)
        return value
