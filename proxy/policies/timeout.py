"""Attempt timeout: one try must produce response headers within ``attempt``.

Innermost policy, right above the upstream call, so it times exactly one
attempt (connect + send + wait for headers).  The body stream afterwards is
governed by the ``idle`` timeout inside the upstream session.  When it fires
while the upload is waiting for the app's next body bytes, the app is the slow
side: the attempt ends with ``client_timeout``, which is neither retried nor a
breaker failure.
"""

from __future__ import annotations

import asyncio

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.errors import ClientTimeout, UpstreamTimeout
from proxy.telemetry.metrics import RouteMetrics
from proxy.timers import TimerWheel


class AttemptTimeout:
    __slots__ = ("_attempt", "_message", "_metrics", "_wheel")

    def __init__(self, attempt_s: float, upstream: str, metrics: RouteMetrics) -> None:
        self._attempt = attempt_s
        self._metrics = metrics
        self._message = (f"upstream {upstream} sent no response headers within the attempt timeout "
                         f"of {attempt_s:g}s")
        self._wheel: TimerWheel | None = None  # per event loop, made on first use

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        wheel = self._wheel
        if wheel is None or wheel.loop is not asyncio.get_running_loop():
            wheel = self._wheel = TimerWheel(asyncio.get_running_loop())
        timer = wheel.start(self._attempt)
        try:
            return await call_next(request)
        except asyncio.CancelledError:
            if not timer.take():
                raise
            if request.body.waiting_on_app:
                raise ClientTimeout("the app did not send its request body in time: the upload stalled "
                                    "within the attempt timeout") from None
            self._metrics.timeouts["attempt"].inc()
            raise UpstreamTimeout(self._message) from None
        finally:
            timer.stop()
