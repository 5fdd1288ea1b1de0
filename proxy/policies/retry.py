"""Retry: resend failed attempts with backoff, within a budget and the deadline.

Sits inside the deadline (so backoff can never outlive the request) and
outside the circuit breaker (so every attempt asks the breaker, and a retry
is never sent to an open upstream).  A retry happens only when all hold:

* the failure matches ``retry_on`` and attempts remain (``max_attempts``,
  tightened by ``x-outrigger-max-attempts``);
* resending is safe: the request never reached the upstream, or it is
  idempotent (method, ``Idempotency-Key`` or ``retry_non_idempotent``) and
  its body was buffered;
* the wait (backoff, or ``Retry-After`` when honoured) ends before the
  deadline;
* the retry budget has room.

When any of these fails, the last response or error goes back as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.config import RetryConfig
from proxy.errors import ProxyError
from proxy.policies.backoff import Backoff, parse_ratelimit_reset, parse_retry_after
from proxy.policies.budget import RetryBudget
from proxy.telemetry.metrics import RouteMetrics

_GATEWAY: Final = frozenset({502, 503, 504})
_REASON: Final = {"connect-failure": "connect_failure", "reset": "reset", "timeout": "timeout"}
_RETRY_AFTER_STATUSES: Final = frozenset({429, 503})


class Retry:
    __slots__ = (
        "_backoff", "_budget", "_clock", "_codes", "_gate", "_kinds", "_max", "_metrics", "_non_idempotent",
        "_reasons", "_respect_retry_after", "_wall",
    )

    def __init__(self, config: RetryConfig, *, budget: RetryBudget, backoff: Backoff, clock: Clock,
                 metrics: RouteMetrics, wall: Callable[[], float] = time.time,
                 gate: Callable[[], bool] | None = None) -> None:
        """``gate()`` says whether another attempt could go out now (the route's breaker): when it
        says no, the last answer stands, and no budget or backoff is spent on a retry that would
        only be refused.  Asked before the backoff, not at its end: a breaker that is open now
        (even if due to half-open during the backoff, when only its probes would get through)
        keeps the upstream's answer.  Best effort: the breaker may still trip during the backoff."""
        self._max = config.max_attempts
        on = set(config.retry_on)
        self._kinds = frozenset(k for k in on if k in _REASON)
        codes: set[int] = set()
        if "gateway-error" in on:
            codes |= _GATEWAY
        if "5xx" in on:
            codes |= set(range(500, 600))
        if "retriable-status-codes" in on:
            codes |= set(config.retriable_status_codes)
        self._codes = frozenset(codes)
        self._reasons = {code: f"http_{code}" for code in codes}  # bounded label values, built once
        self._non_idempotent = config.retry_non_idempotent
        self._respect_retry_after = config.respect_retry_after
        self._budget = budget
        self._backoff = backoff
        self._clock = clock
        self._metrics = metrics
        self._wall = wall
        self._gate = gate

    @property
    def budget(self) -> RetryBudget:
        return self._budget

    def _may_resend(self, request: ProxyRequest, sent: bool) -> bool:
        if not sent:
            return True  # never reached the upstream: safe for any method
        return request.body.replayable and (self._non_idempotent or request.idempotent)

    def _server_wait(self, response: ProxyResponse) -> float | None:
        if not self._respect_retry_after or response.status not in _RETRY_AFTER_STATUSES:
            return None
        headers = response.headers
        value = headers.get("Retry-After")
        if value is not None:
            return parse_retry_after(value, self._wall())
        value = headers.get("X-RateLimit-Reset") or headers.get("RateLimit-Reset")
        return parse_ratelimit_reset(value, self._wall()) if value is not None else None

    def _admit(self, request: ProxyRequest, wait_s: float, reason: str) -> bool:
        """Deadline and breaker first (they cost nothing), then the budget (spends a token)."""
        if self._clock.now() + wait_s >= request.deadline:
            if request.span is not None:  # attribute dicts are built only for recorded spans
                request.event("retry_abandoned", {"outrigger.reason": "deadline", "outrigger.wait_s": wait_s})
            return False
        if self._gate is not None and not self._gate():
            if request.span is not None:
                request.event("retry_abandoned", {"outrigger.reason": "circuit_open", "outrigger.wait_s": wait_s})
            return False
        if not self._budget.try_withdraw():
            self._metrics.budget_exhausted.inc()
            if request.span is not None:
                request.event("retry_budget_exhausted", {"outrigger.reason": reason})
            return False
        self._metrics.retry(reason)
        return True

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        self._budget.record_request()
        max_attempts = self._max
        if request.max_attempts is not None and request.max_attempts < max_attempts:
            max_attempts = request.max_attempts
        previous = 0.0
        attempt = 0
        while True:
            attempt += 1
            request.attempt = attempt
            try:
                response = await call_next(request)
            except ProxyError as error:
                attempt = request.attempt  # a stale-connection resend below took one more (StaleResend)
                kind = error.retry_kind
                if kind is None or kind not in self._kinds or attempt >= max_attempts \
                        or not self._may_resend(request, error.sent):
                    raise
                reason = _REASON[kind]
                wait = self._backoff(attempt - 1, previous)
                if not self._admit(request, wait, reason):
                    raise
            else:
                attempt = request.attempt
                status = response.status
                if status not in self._codes or attempt >= max_attempts \
                        or not self._may_resend(request, True):
                    return response
                reason = self._reasons[status]
                server_wait = self._server_wait(response)
                wait = self._backoff(attempt - 1, previous) if server_wait is None else server_wait
                if not self._admit(request, wait, reason):
                    return response
                if server_wait is not None and request.span is not None:
                    request.event("retry_after_honoured", {"outrigger.wait_s": server_wait})
                response.release()  # discarded: frees its connection and bulkhead slot now
            if request.span is not None:
                request.event("backoff", {"outrigger.wait_s": wait, "outrigger.reason": reason,
                                          "outrigger.attempt": attempt})
            if wait > 0:
                await self._clock.sleep(wait)
            previous = wait
