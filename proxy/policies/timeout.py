"""Attempt timeout: one try must produce response headers within ``attempt``.

Innermost policy, right above the upstream call, so it times exactly one
attempt (connect + send + wait for headers).  The body stream afterwards is
governed by the ``idle`` timeout inside the upstream session.
"""

from __future__ import annotations

import asyncio

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.errors import UpstreamTimeout
from proxy.telemetry.metrics import RouteMetrics


class AttemptTimeout:
    __slots__ = ("_attempt", "_message", "_metrics")

    def __init__(self, attempt_s: float, upstream: str, metrics: RouteMetrics) -> None:
        self._attempt = attempt_s
        self._metrics = metrics
        self._message = (f"upstream {upstream} sent no response headers within the attempt timeout "
                         f"of {attempt_s:g}s")

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        timer = asyncio.timeout(self._attempt)
        try:
            async with timer:
                return await call_next(request)
        except TimeoutError:
            if not timer.expired():
                raise
            self._metrics.timeouts["attempt"].inc()
            raise UpstreamTimeout(self._message) from None
