"""Total timeout: the request's deadline across all attempts and backoff.

Sits outside the retry policy so that one clock bounds every attempt, every
backoff sleep and the upload of the request body.  The absolute deadline is
stored on the request so inner layers (retry, upstream) can see how much
time is left and never wait past it.
"""

from __future__ import annotations

import asyncio

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.errors import DeadlineExceeded
from proxy.telemetry.metrics import RouteMetrics
from proxy.timers import TimerWheel


class Deadline:
    __slots__ = ("_clock", "_metrics", "_total_s", "_wheel")

    def __init__(self, total_s: float, clock: Clock, metrics: RouteMetrics, wheel: TimerWheel) -> None:
        self._total_s = total_s
        self._clock = clock
        self._metrics = metrics
        self._wheel = wheel  # the sidecar's one wheel (proxy.app)

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        total = self._total_s
        if request.timeout_override is not None and request.timeout_override < total:
            total = request.timeout_override  # overrides only ever tighten
        request.deadline = self._clock.now() + total
        timer = request.deadline_timer = self._wheel.start(total)
        try:
            return await call_next(request)
        except asyncio.CancelledError:
            if not timer.take():
                raise  # not ours (the app went away, or the sidecar is stopping)
            self._metrics.timeouts["total"].inc()
            if request.span is not None:
                request.event("deadline_exceeded", {"outrigger.timeout_s": total})
            raise DeadlineExceeded(f"request did not complete within the total timeout of {total:g}s") from None
        finally:
            timer.stop()
