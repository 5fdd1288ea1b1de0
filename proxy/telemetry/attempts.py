"""Attempt telemetry: one CLIENT span and one metric sample per upstream attempt.

Placed between the bulkhead and the attempt timeout, so it sees exactly the
attempts that went out (not ones shed by the bulkhead or breaker) and the
timeout that ended them.  It injects the CLIENT span's context into the
attempt's headers, so each retry appears as its own child in Jaeger.  A
hedged attempt's span carries ``outrigger.hedge=true``; the adaptive attempt
timeout in force (set by ``AttemptTimeout`` below) is recorded as
``outrigger.attempt_timeout_s`` when the attempt ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.errors import DeadlineExceeded, ProxyError, UpstreamConnectFailure, UpstreamTimeout, UpstreamTlsError
from proxy.telemetry import client_span
from proxy.telemetry.metrics import RouteMetrics
from proxy.telemetry.propagation import trace_id_hex
from proxy.upstream.call import ConnectTimeout

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from proxy.telemetry.tracing import Tracing
    from proxy.upstream.call import UpstreamPool


def attempt_result(error: ProxyError) -> str:
    """The ``result`` label of an attempt that ended in ``error``."""
    if isinstance(error, UpstreamTimeout):
        return "timeout"
    if isinstance(error, UpstreamConnectFailure | UpstreamTlsError):
        return "connect_failure"
    return "reset"


def status_result(status: int) -> str:
    """The ``result`` label of an attempt answered with ``status``."""
    return "http_5xx" if status >= 500 else "http_4xx" if status >= 400 else "success"


def _exemplar(span: Span | None) -> dict[str, str] | None:
    if span is None:
        return None
    return {"trace_id": trace_id_hex(span.get_span_context().trace_id)}


def _timeout_attribute(span: Span, request: ProxyRequest) -> None:
    if request.attempt_timeout_s is not None:
        span.set_attribute("outrigger.attempt_timeout_s", round(request.attempt_timeout_s, 6))


class AttemptTelemetry:
    __slots__ = ("_clock", "_metrics", "_pool", "_route", "_tracing")

    def __init__(self, *, route: str, pool: UpstreamPool, metrics: RouteMetrics, clock: Clock,
                 tracing: Tracing | None) -> None:
        self._route = route
        self._pool = pool
        self._metrics = metrics
        self._clock = clock
        self._tracing = tracing

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        metrics = self._metrics
        tracing = self._tracing
        span = None
        if request.span is not None and tracing is not None:  # unsampled requests cost nothing here
            span = tracing.start_client_span(request, self._route, self._pool)
            if request.hedge:
                span.set_attribute("outrigger.hedge", True)
        start = self._clock.now()
        try:
            response = await call_next(request)
        except ProxyError as error:
            elapsed = self._clock.now() - start
            request.upstream_s += elapsed
            metrics.attempt_duration.observe(elapsed, _exemplar(span))
            if not error.client_fault:  # an attempt the app's body ended has no upstream result
                metrics.attempt_results[attempt_result(error)].inc()
            if isinstance(error, ConnectTimeout):
                metrics.timeouts["connect"].inc()
            if span is not None:
                _timeout_attribute(span, request)
                client_span.end(span, None, error)
            raise
        except BaseException:
            now = self._clock.now()
            request.upstream_s += now - start
            deadline = request.deadline_expired  # cancelled by the total timeout, not by the app leaving
            if deadline:
                metrics.attempt_duration.observe(now - start, _exemplar(span))
                metrics.attempt_results["timeout"].inc()
            # Any other cancellation (the app went away, shutdown) has no result label of its own:
            # the attempt is on its span, not in the metric.
            if span is not None:
                _timeout_attribute(span, request)
                client_span.end(span, None, None,
                                error_type=DeadlineExceeded.code if deadline else "cancelled")
            raise
        elapsed = self._clock.now() - start
        request.upstream_s += elapsed
        metrics.attempt_duration.observe(elapsed, _exemplar(span))
        status = response.status
        metrics.attempt_results[status_result(status)].inc()
        if span is not None:
            _timeout_attribute(span, request)
            peer = response.upstream.peer if response.upstream is not None else None
            client_span.end(span, status, None, peer=peer, reused=response.reused)
        return response
