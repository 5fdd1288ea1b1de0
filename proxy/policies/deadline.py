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


class Deadline:
    __slots__ = ("_clock", "_metrics", "_total")

    def __init__(self, total_s: float, clock: Clock, metrics: RouteMetrics) -> None:
        self._total = total_s
        self._clock = clock
        self._metrics = metrics

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        total = self._total
        if request.timeout_override is not None and request.timeout_override < total:
            total = request.timeout_override  # overrides only ever tighten
        request.deadline = self._clock.now() + total
        timer = asyncio.timeout(total)
        try:
            async with timer:
                return await call_next(request)
        except TimeoutError:
            if not timer.expired():
                raise  # a TimeoutError from below that is not ours must not pose as the deadline
            self._metrics.timeouts["total"].inc()
            if request.span is not None:
                request.event("deadline_exceeded", {"outrigger.timeout_s": total})
            error = DeadlineExceeded(f"request did not complete within the total timeout of {total:g}s")
            error.attempts = request.attempt
            raise error from None
