"""Circuit breaker policy: ask the breaker before each attempt, report after.

Inside the retry policy, so every attempt (retries included) is gated and
counted.  Outside the bulkhead, so an open breaker rejects without taking a
concurrency slot.  The state machine itself lives in ``breaker.py``; this
layer only classifies outcomes: connect failures, resets, attempt timeouts
and ``failure_status_codes`` are failures; any other response (4xx
included) is a success; a cancelled or shed attempt gives no verdict.
"""

from __future__ import annotations

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.errors import CircuitOpen, ProxyError
from proxy.policies.breaker import CircuitBreaker


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
        if not breaker.try_acquire():
            retry_after = breaker.retry_after()
            if request.span is not None:  # the fast-fail path builds no attribute dict when unsampled
                request.event("circuit_open", {"outrigger.retry_after_s": retry_after})
            raise CircuitOpen(self._message, retry_after=retry_after)
        start = self._clock.now()
        try:
            response = await call_next(request)
        except ProxyError as error:
            if error.breaker_failure:
                breaker.record_failure(self._clock.now() - start)
            else:
                breaker.record_cancelled()
            raise
        except BaseException:
            breaker.record_cancelled()
            raise
        if response.status in self._failure_codes:
            breaker.record_failure(self._clock.now() - start)
        else:
            breaker.record_success(self._clock.now() - start)
        return response
