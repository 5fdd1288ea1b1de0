"""Stale-connection resend: the one resend for the keep-alive race, as a counted attempt.

A pooled connection can be closed by the upstream's keep-alive timeout just as
a request goes out on it; the upstream never processed that request.  The
client raises ``StaleConnection`` only for that case (a reused connection that
sat idle for ``h1client.STALE_IDLE_S`` and closed before any response byte),
and this policy resends an idempotent, replayable request once, on a new
connection.

Sits inside the breaker and the bulkhead (the race is no upstream failure and
the resend keeps the attempt's slot) and outside attempt telemetry, so both
tries are counted as attempts and traced as CLIENT spans.  The resend:

* happens at most once per request;
* is an attempt: ``x-outrigger-attempts``, ``outrigger_upstream_attempts_total``
  and the retry policy's ``max_attempts`` all count it (with ``max_attempts: 1``
  it is the one exception, a second attempt, because the first never reached the
  upstream's application);
* is a retry: ``outrigger_retries_total{reason="stale_connection"}``, charged to
  the retry budget, so a resetting upstream cannot turn it into a storm.
"""

from __future__ import annotations

from typing import Final

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.policies.budget import RetryBudget
from proxy.telemetry.metrics import RouteMetrics
from proxy.upstream.connection import StaleConnection

REASON: Final = "stale_connection"


class StaleResend:
    __slots__ = ("_budget", "_max", "_metrics")

    def __init__(self, *, max_attempts: int, budget: RetryBudget, metrics: RouteMetrics) -> None:
        self._max = max(max_attempts, 2)  # see the module docstring for why 1 still allows the resend
        self._budget = budget
        self._metrics = metrics

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        try:
            response = await call_next(request)
        except StaleConnection:
            if not self._may_resend(request):
                raise
            request.stale_resent = True
            request.fresh_connection = True
            request.event("stale_connection_resent", {"outrigger.attempt": request.attempt})
            request.attempt += 1
            response = await call_next(request)
        return response

    def _may_resend(self, request: ProxyRequest) -> bool:
        limit = self._max if request.max_attempts is None else min(self._max, max(request.max_attempts, 2))
        if request.stale_resent or request.attempt >= limit \
                or not (request.idempotent and request.body.replayable):
            return False
        if not self._budget.try_withdraw():
            self._metrics.budget_exhausted.inc()
            request.event("retry_budget_exhausted", {"outrigger.reason": REASON})
            return False
        self._metrics.retry(REASON)
        return True
