"""Attempt timeout: one try must produce response headers within ``attempt``.

Innermost policy, right above the upstream call, so it times exactly one
attempt (connect + send + wait for headers).  The body stream afterwards is
governed by the ``idle`` timeout inside the upstream session.

With ``timeout.adaptive`` the value comes from ``AdaptiveTimeout`` per
attempt (reported on the attempt's span as ``outrigger.attempt_timeout_s``,
never past the remaining deadline; a retry's is doubled per try, see
``adaptive_timeout``).  When the route has a latency sketch
(adaptive timeout or ``hedge.delay: auto``) this layer feeds it: the time to
response headers of every answered attempt (not 5xx or 429, whose speed says
nothing about a healthy answer's), and, for an attempt it cut off, the
timeout itself: a lower bound of that latency, so a too-tight learned value
can grow out of it rather than only ever seeing the answers that beat it.

An attempt cut off by a learned value shorter than ``attempt`` raises
``LearnedTimeout``: a 504 ``upstream_timeout`` that is retried like any
attempt timeout but is no circuit-breaker failure.  It says the answer was
slow against recent history, not that the upstream failed the route's own
``attempt`` budget; counted as a failure, a lasting slowdown would trip the
breaker (five cut-offs in a row) before the learned value catches up.

When it fires while the upload is waiting for the app's next body bytes, the
app is the slow side: the attempt ends with ``client_timeout``, which is
neither retried nor a breaker failure.
"""

from __future__ import annotations

import asyncio

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.errors import ClientTimeout, UpstreamTimeout
from proxy.policies.adaptive_timeout import AdaptiveTimeout
from proxy.policies.latency import LatencySketch
from proxy.telemetry.metrics import RouteMetrics
from proxy.timers import TimerWheel


def _blame_a_stalled_upload(request: ProxyRequest) -> None:
    """The attempt timed out while waiting on the app's next body bytes: the app is the slow side."""
    if request.body.waiting_on_app:
        raise ClientTimeout("the app did not send its request body in time: the upload stalled "
                            "within the attempt timeout") from None


class LearnedTimeout(UpstreamTimeout):
    """The adaptive timeout, below ``attempt``, cut the attempt off (not a breaker failure)."""

    breaker_failure = False


class AttemptTimeout:
    __slots__ = ("_adaptive", "_attempt_s", "_clock", "_message", "_metrics", "_sketch", "_upstream", "_wheel")

    def __init__(self, attempt_s: float, upstream: str, metrics: RouteMetrics, wheel: TimerWheel, *,
                 adaptive: AdaptiveTimeout | None = None, sketch: LatencySketch | None = None,
                 clock: Clock | None = None) -> None:
        if (adaptive is not None or sketch is not None) and clock is None:
            raise ValueError("an adaptive timeout or a latency sketch needs a clock")
        self._attempt_s = attempt_s
        self._metrics = metrics
        self._upstream = upstream
        self._message = (f"upstream {upstream} sent no response headers within the attempt timeout "
                         f"of {attempt_s:g}s")
        self._wheel = wheel  # the sidecar's one wheel (proxy.app)
        self._adaptive = adaptive
        self._sketch = sketch if sketch is not None else adaptive.sketch if adaptive is not None else None
        self._clock = clock

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        wheel = self._wheel
        sketch = self._sketch
        if sketch is None:
            timer = wheel.start(self._attempt_s)
            try:
                return await call_next(request)
            except asyncio.CancelledError:
                if not timer.take():
                    raise
                _blame_a_stalled_upload(request)
                self._metrics.timeouts["attempt"].inc()
                raise UpstreamTimeout(self._message) from None
            finally:
                timer.stop()
        return await self._learning(request, call_next, wheel, sketch)

    async def _learning(self, request: ProxyRequest, call_next: Handler, wheel: TimerWheel,
                        sketch: LatencySketch) -> ProxyResponse:
        clock = self._clock
        assert clock is not None
        start = clock.now()
        timeout = self._attempt_s
        if self._adaptive is not None:
            timeout = self._adaptive.current(request.attempt)
            left = request.deadline - start
            # The deadline policy's own timer ends the request at the deadline; this is the value in force.
            request.attempt_timeout_s = left if left < timeout else timeout
        timer = wheel.start(timeout, yield_to_io=self._adaptive is not None)
        try:
            response = await call_next(request)
        except asyncio.CancelledError:
            if not timer.take():
                raise
            _blame_a_stalled_upload(request)
            sketch.add(timeout, censored=True)
            self._metrics.timeouts["attempt"].inc()
            error = LearnedTimeout if timeout < self._attempt_s else UpstreamTimeout
            raise error(f"upstream {self._upstream} sent no response headers within the attempt "
                        f"timeout of {timeout:g}s") from None
        finally:
            timer.stop()
        status = response.status
        if status < 500 and status != 429:
            sketch.add(clock.now() - start)
        return response
