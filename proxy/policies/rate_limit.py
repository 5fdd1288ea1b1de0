"""Rate limit: a token bucket per route, or per value of a key header.

Outermost policy, so a rejected request costs nothing downstream: no
deadline, no retry budget, no breaker probe, no connection.  Over the limit
it answers 429 ``rate_limited`` with ``Retry-After`` and the IETF
``RateLimit-*`` headers, or (``mode: queue``) waits up to ``max_wait``.
A queue wait is part of the request's total timeout: it never runs past it
(a request whose token is due later is refused at once), and the deadline
inside gets only what the wait left.
The limit is per sidecar process: N replicas allow N times the rate (``scope:
global`` shares one: ``proxy.policies.global_rate_limit``).  ``shadow: true``
counts and traces would-be refusals but lets them through.
"""

from __future__ import annotations

import math
from typing import Any, Final

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.config import RateLimitConfig
from proxy.errors import RateLimited
from proxy.policies.token_bucket import KeyedTokenBuckets, TokenBucket
from proxy.telemetry.metrics import RouteMetrics

_MIN_LEFT_S: Final = 0.001  # a queued request keeps at least this much of its deadline for the upstream


class RateLimit:
    __slots__ = ("_burst", "_clock", "_header", "_keyed", "_max_wait", "_metrics", "_queue", "_shadowed",
                 "_single")

    def __init__(self, config: RateLimitConfig, clock: Clock, metrics: RouteMetrics,
                 shadowed: Any | None = None) -> None:
        self._clock = clock
        self._metrics = metrics
        self._burst = str(config.burst)
        self._queue = config.mode == "queue"
        self._max_wait = config.max_wait
        self._shadowed = shadowed  # the shadow counter when `shadow: true`, else None
        self._header = config.key.header if config.key else None
        self._single: TokenBucket | None = None
        self._keyed: KeyedTokenBuckets | None = None
        if self._header is None:
            self._single = TokenBucket(config.requests_per_second, config.burst, clock)
        else:
            self._keyed = KeyedTokenBuckets(config.requests_per_second, config.burst, config.max_keys, clock)

    def bucket_for(self, request: ProxyRequest) -> TokenBucket:
        if self._single is not None:
            return self._single
        assert self._keyed is not None and self._header is not None
        return self._keyed.get(request.headers.get(self._header, ""))

    def snapshot(self) -> dict[str, object]:
        if self._single is not None:
            return {"tokens": round(self._single.tokens, 3)}
        assert self._keyed is not None
        return {"keys": len(self._keyed)}

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        bucket = self.bucket_for(request)
        if bucket.try_take():
            return await call_next(request)
        if self._queue:
            total = math.inf if request.timeout_override is None else request.timeout_override  # time left
            max_wait = min(self._max_wait, total - _MIN_LEFT_S)  # never wait past the deadline
            wait = bucket.reserve(max_wait) if max_wait >= 0.0 else None
            if wait is not None:
                if request.span is not None:
                    request.event("rate_limit_queued", {"outrigger.wait_s": wait})
                if wait > 0.0:
                    await self._clock.sleep(wait)
                    if total != math.inf:
                        request.timeout_override = total - wait  # the deadline gets what the wait left
                return await call_next(request)
        retry_after = bucket.wait_time()
        if self._shadowed is not None:
            self._shadowed.inc()
            request.event("rate_limit_shadowed", {"outrigger.retry_after_s": retry_after})
            return await call_next(request)
        self._metrics.rate_limited.inc()
        if request.span is not None:
            request.event("rate_limited", {"outrigger.retry_after_s": retry_after})
        raise RateLimited(
            "rate limit exceeded for this route",
            retry_after=retry_after,
            headers={
                "RateLimit-Limit": self._burst,
                "RateLimit-Remaining": str(max(0, math.floor(bucket.tokens))),
                "RateLimit-Reset": str(max(1, math.ceil(bucket.reset_after()))),
            },
        )
