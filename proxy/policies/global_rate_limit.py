"""Global rate limit (``scope: global``): one limit shared by every sidecar with the same ``name``.

Sits where the local rate limit would (outermost but fallback and
idempotency).  Each sidecar spends tokens leased from one Redis-side GCRA
(``proxy.store.gcra``) and refills its lease in the background at a
low-water mark (``proxy.policies.lease``), so a request waits on Redis only
when the local balance is empty.

When Redis fails (3 lease calls in a row err or time out and its breaker
opens) the limit changes mode by ``on_store_error`` (a request that waited
for a failed call is decided by that rule alone): ``local`` enforces this
replica's share, ``requests_per_second / live replicas`` (the last count the
heartbeat saw), on a local token bucket; ``open`` admits everything;
``closed`` refuses everything with 429.  While in fallback the next
request that finds the Redis breaker willing starts a background lease; the
first one granted switches back to ``global``.  Every mode change is logged,
shown in ``outrigger_rate_limit_mode`` and put on the next request's span.

Refusals are 429 ``rate_limited`` with ``Retry-After`` and the
``RateLimit-*`` headers of the limit that refused; ``shadow: true`` counts
and traces them but lets the request through.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.config import RateLimitConfig
from proxy.errors import RateLimited
from proxy.policies.breaker_state import BreakerState
from proxy.policies.lease import Grant, LeaseState
from proxy.policies.token_bucket import TokenBucket
from proxy.store.base import KEY_PREFIX, StoreUnavailable, store_key
from proxy.telemetry.metrics import RouteMetrics
from proxy.telemetry.shared_state import LimitMetrics

if TYPE_CHECKING:
    from proxy.store.redis import RedisStore

__all__ = ["GlobalRateLimit"]

log = logging.getLogger("outrigger.rate_limit")
_FALLBACK_MODES = {"local": "local_fallback", "open": "open", "closed": "closed"}


class _Limit:
    """One shared limit (one per key value): its lease, its fallback bucket, its refill in flight."""

    __slots__ = ("fallback", "key", "lease", "refilled", "share")

    def __init__(self, key: str, lease: LeaseState) -> None:
        self.key = key
        self.lease = lease
        self.fallback: TokenBucket | None = None
        self.share = 0  # the live replica count the fallback bucket was sized for
        self.refilled: asyncio.Event | None = None


class GlobalRateLimit:
    def __init__(self, config: RateLimitConfig, route: str, store: RedisStore, clock: Clock,
                 route_metrics: RouteMetrics, metrics: LimitMetrics) -> None:
        self.store = store
        self.name = config.name or route
        self._config = config
        self._clock = clock
        self._route_metrics = route_metrics
        self._metrics = metrics
        self._rate = float(config.requests_per_second)
        self._interval_us = 1e6 / self._rate
        self._prefix = f"{KEY_PREFIX}rl:{self.name}"
        self._header = config.key.header if config.key else None
        self._limits: OrderedDict[str, _Limit] = OrderedDict()
        self._replicas = store.replicas(self.name)
        self._fallback_mode = _FALLBACK_MODES[config.on_store_error]
        self.mode = "global"
        self._announce: tuple[str, str] | None = None  # a mode change not yet put on a span
        self._tasks: set[asyncio.Task[None]] = set()
        self.decisions = 0  # requests decided (for /status and the benchmark)
        self.waited = 0  # requests that waited on a Redis round trip
        metrics.show_mode(self.mode)

    # --- the request path ---

    def _limit_for(self, request: ProxyRequest) -> _Limit:
        value = "" if self._header is None else request.headers.get(self._header, "")
        limit = self._limits.get(value)
        if limit is not None:
            if self._header is not None:
                self._limits.move_to_end(value)
            return limit
        key = self._prefix if self._header is None else store_key(self._prefix + ":k", value)
        limit = self._limits[value] = _Limit(key, LeaseState(self._rate, self._clock, burst=self._config.burst))
        self._fallback_bucket(limit)  # made now: it tracks this replica's spending in every mode
        if len(self._limits) > self._config.max_keys:
            self._limits.popitem(last=False)
        return limit

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        self.decisions += 1
        if self._announce is not None and request.span is not None:
            old, new = self._announce
            self._announce = None
            request.event("rate_limit_mode_changed", {"outrigger.mode": new, "outrigger.previous_mode": old})
        limit = self._limit_for(request)
        if self.mode == "global":
            lease = limit.lease
            if lease.try_take():
                if lease.balance < lease.low_water():
                    self._refill(limit)
                self._track_spend(limit)
                return await call_next(request)
            outcome = await self._wait_for_lease(limit, request)
            if outcome == "token":
                self._track_spend(limit)
                return await call_next(request)
            if outcome == "fallback":  # Redis failed or was too slow for this request: on_store_error decides
                if self._fallback_admits(limit, self._fallback_mode):
                    return await call_next(request)
                return await self._refuse(limit, request, call_next, self._fallback_mode)
        if self.mode != "global":
            self._probe(limit)
            if self._fallback_admits(limit, self.mode):
                return await call_next(request)
        return await self._refuse(limit, request, call_next, self.mode)

    async def _wait_for_lease(self, limit: _Limit, request: ProxyRequest) -> str:
        """No token here: wait for a lease, unless the shared bucket is known to be empty.

        ``token`` (one was taken), ``refuse`` or ``fallback`` (Redis did not answer in time).
        """
        lease = limit.lease
        if lease.retry_after() > 0.0:
            return "refuse"  # the GCRA said when the next token is free: no round trip can change that
        if lease.saturated:
            # The shared bucket was empty at the last call: fetch what has refilled since in the
            # background, for the requests to come. Holding this one for the round trip would
            # only decide which request gets the token, not how many do.
            self._refill(limit, empty_only=True)
            return "refuse"
        clock = self._clock
        started = clock.now()
        left = math.inf if request.timeout_override is None else request.timeout_override
        self.waited += 1
        lease.waiting += 1  # the next lease covers every request waiting for it
        try:
            for _ in range(3):  # a cold start's first lease may be too small for the requests it met
                if not lease.pending:
                    self._refill(limit, empty_only=True)
                event = limit.refilled
                if event is None or not lease.pending:
                    return "refuse"
                # Never past the request's deadline, nor past the lease call's own timeout.
                wait = min(left - (clock.now() - started), self.store.timeout_s * 1.5)
                try:
                    async with asyncio.timeout(max(0.0, wait)):
                        await event.wait()
                except TimeoutError:
                    return "fallback"
                if self.mode != "global":
                    return "fallback"
                if lease.try_take():
                    return "token"
                if lease.retry_after() > 0.0:
                    return "refuse"
            return "refuse"
        finally:
            lease.waiting -= 1
            if request.timeout_override is not None:  # the deadline inside gets what the wait left
                request.timeout_override = max(0.0, request.timeout_override - (clock.now() - started))

    def _track_spend(self, limit: _Limit) -> None:
        """Spend from the fallback bucket too (if it can), so that it reflects this replica's recent use:
        a switch to ``local_fallback`` (or a Redis flapping between modes) then never hands out a fresh burst
        on top of the tokens just spent from leases."""
        self._fallback_bucket(limit).try_take()

    def _fallback_admits(self, limit: _Limit, mode: str) -> bool:
        if mode == "open":
            return True
        if mode == "closed":
            return False
        return self._fallback_bucket(limit).try_take()

    def _fallback_bucket(self, limit: _Limit) -> TokenBucket:
        """This replica's share of the limit, ``rate / live replicas``, sized again when the count changes."""
        live = max(1, self._replicas.live)
        if limit.fallback is None or limit.share != live:
            burst = max(1, math.ceil(self._config.burst / live))
            limit.fallback, limit.share = TokenBucket(self._rate / live, burst, self._clock), live
        return limit.fallback

    async def _refuse(self, limit: _Limit, request: ProxyRequest, call_next: Handler, mode: str) -> ProxyResponse:
        retry_after, remaining, reset = self._refusal(limit, mode)
        if self._config.shadow:
            self._metrics.shadowed.inc()
            request.event("rate_limit_shadowed", {"outrigger.retry_after_s": retry_after})
            return await call_next(request)
        self._route_metrics.rate_limited.inc()
        request.event("rate_limited", {"outrigger.retry_after_s": retry_after, "outrigger.mode": mode})
        raise RateLimited(f"rate limit '{self.name}' exceeded", retry_after=retry_after, headers={
            "RateLimit-Limit": str(self._config.burst),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(max(1, math.ceil(reset))),
        })

    def _refusal(self, limit: _Limit, mode: str) -> tuple[float, int, float]:
        """(Retry-After, RateLimit-Remaining, RateLimit-Reset) of the limit that refused, in ``mode``."""
        if mode == "global":
            lease = limit.lease
            return max(lease.retry_after(), 1.0 / self._rate), 0, lease.full_after()
        if mode == "local_fallback" and limit.fallback is not None:
            bucket = limit.fallback
            return bucket.wait_time(), max(0, math.floor(bucket.tokens)), bucket.reset_after()
        # closed: nothing is admitted until Redis answers again; the breaker says when it will be asked.
        wait = max(1.0, self.store.breaker.retry_after())
        return wait, 0, wait

    # --- leases ---

    def _refill(self, limit: _Limit, *, empty_only: bool = False) -> None:
        asked = limit.lease.refill_size(empty_only=empty_only)
        if asked <= 0:
            return
        limit.lease.start()
        limit.refilled = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._lease(limit, asked, limit.refilled))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _probe(self, limit: _Limit) -> None:
        """In fallback: try a lease in the background when the Redis breaker would let one through."""
        if not limit.lease.pending and self.store.breaker.would_admit():
            limit.lease.start()
            limit.refilled = asyncio.Event()
            task = asyncio.get_running_loop().create_task(self._lease(limit, 1, limit.refilled))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _lease(self, limit: _Limit, asked: int, done: asyncio.Event) -> None:
        self.store.ensure_heartbeat(self._replicas)
        try:
            granted, retry_us, full_us = await self.store.lease(
                limit.key, self._interval_us, self._config.burst, asked)
        except StoreUnavailable as exc:
            limit.lease.on_error()
            self._metrics.leases["error"].inc()
            self._metrics.store_errors.inc()
            # One slow call is not an outage: requests that waited for it were decided by on_store_error,
            # the mode changes once the Redis breaker opens (3 failures in a row). Switching on every
            # error would let a replica that is merely starved of CPU admit its share on top of the
            # tokens the others keep leasing.
            if self.store.breaker.state is not BreakerState.CLOSED:
                self._set_mode(self._fallback_mode, str(exc))
                for other in self._limits.values():
                    other.lease.drop()  # leases are not spent in fallback: the share rule decides alone
        else:
            limit.lease.on_grant(asked, Grant(granted, retry_us / 1e6, full_us / 1e6))
            result = "granted" if granted >= asked else "partial" if granted > 0 else "denied"
            self._metrics.leases[result].inc()
            self._set_mode("global", "Redis answers again")
        finally:
            done.set()

    def _set_mode(self, mode: str, why: str) -> None:
        if mode == self.mode:
            return
        old, self.mode = self.mode, mode
        self._announce = (old, mode)
        self._metrics.show_mode(mode)
        log.warning("rate limit '%s' mode %s -> %s: %s", self.name, old, mode, why,
                    extra={"live_replicas": self._replicas.live})

    # --- status ---

    def snapshot(self) -> dict[str, Any]:
        data: dict[str, Any] = {"scope": "global", "name": self.name, "mode": self.mode,
                                "live_replicas": self._replicas.live, "decisions": self.decisions,
                                "waited_on_store": self.waited}
        if self._header is None:
            limit = self._limits.get("")
            if limit is not None:
                data["balance"] = limit.lease.balance
                if limit.fallback is not None and self.mode == "local_fallback":
                    data["fallback_tokens"] = round(limit.fallback.tokens, 3)
            else:
                data["balance"] = 0
        else:
            data["keys"] = len(self._limits)
            data["balance"] = sum(limit.lease.balance for limit in self._limits.values())
        return data

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
