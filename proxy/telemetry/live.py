"""Live per-route figures for /status and the status page: plain integers and a latency window.

Kept beside the Prometheus children in ``RouteMetrics`` and fed by the same
calls (``request_done``, inflight up/down), so /status never reads
prometheus_client internals.  The window holds the last ``WINDOW`` request
durations (an append to a bounded deque per request); p99 is computed only
when /status is read.  Rates are left to the reader: it diffs the counters
between two reads.
"""

from __future__ import annotations

import collections
import math
from typing import Final

__all__ = ["WINDOW", "LiveStats"]

WINDOW: Final = 1024


class LiveStats:
    __slots__ = ("durations", "errors", "inflight", "requests")

    def __init__(self) -> None:
        self.inflight = 0  # also the outrigger_inflight_requests gauge, read at scrape time
        self.requests = 0
        self.errors = 0  # responses with a 5xx status, Outrigger's own included
        self.durations: collections.deque[float] = collections.deque(maxlen=WINDOW)

    # The edge calls inc()/dec() around each request.
    def inc(self) -> None:
        self.inflight += 1

    def dec(self) -> None:
        self.inflight -= 1

    def done(self, status: int, seconds: float) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        self.durations.append(seconds)

    def p99_s(self) -> float | None:
        """p99 of the window's durations (nearest rank), or None before the first request."""
        if not self.durations:
            return None
        ordered = sorted(self.durations)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    def snapshot(self) -> dict[str, object]:
        p99 = self.p99_s()
        return {"inflight": self.inflight, "requests": self.requests, "errors": self.errors,
                "latency_window": len(self.durations), "p99_s": round(p99, 4) if p99 is not None else None}
