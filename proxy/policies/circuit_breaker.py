"""Circuit breaker policy: ask the breaker before each attempt, report after.

Inside the retry policy, so every attempt (retries included) is gated and
counted.  Outside the bulkhead, so an open breaker rejects without taking a
concurrency slot.  The state machine itself lives in ``breaker_state.py``; this
layer only classifies outcomes: connect failures, resets, attempt timeouts
and ``failure_status_codes`` are failures; so is an attempt the total
deadline cut off while it waited on the upstream (an app that passes its own
deadline down must not blind the breaker to a hanging upstream); any other
response (4xx included) is a success; a deadline that fires while the upload
waits on the app is the app's doing, no verdict; an attempt cancelled for another reason
(the app went away) or shed before it went out gives no verdict.

Durations (for slow calls) are the attempt's own time on the upstream, as
``AttemptTelemetry`` measures it, not time queued in the bulkhead.
"""

from __future__ import annotations

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.errors import CircuitOpen, ProxyError
from proxy.policies.breaker_state import CircuitBreaker


class CircuitBreakerPolicy:
    __slots__ = ("_breaker", "_clock", "_failure_codes", "_message")

    def __init__(self, breaker: CircuitBreaker, failure_status_codes: tuple[int, ...], clock: Clock,
                 name: str) -> None:
        self._breaker = breaker
        self._failure_codes = frozenset(failure_status_codes)
        self._clock = clock
        self._message = f"circuit breaker for {name} is open"

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        breaker = self._breaker
        ticket = breaker.try_acquire()
        if ticket is None:
            retry_after = breaker.retry_after()
            if request.span is not None:  # the fast-fail path builds no attribute dict when unsampled
                request.event("circuit_open", {"outrigger.retry_after_s": retry_after})
            raise CircuitOpen(self._message, retry_after=retry_after)
        before = request.upstream_s
        try:
            response = await call_next(request)
        except ProxyError as error:
            if error.breaker_failure:
                breaker.record_failure(request.upstream_s - before, ticket)
            else:
                breaker.record_cancelled(ticket)
            raise
        except BaseException:
            upstream_s = request.upstream_s - before
            if upstream_s > 0.0 and request.deadline_expired and not request.body.waiting_on_app:
                breaker.record_failure(upstream_s, ticket)  # the upstream did not answer within the deadline
            else:
                breaker.record_cancelled(ticket)
            raise
        if response.status in self._failure_codes:
            breaker.record_failure(request.upstream_s - before, ticket)
        else:
            breaker.record_success(request.upstream_s - before, ticket)
        return response
