"""Bulkhead: cap concurrent attempts per upstream, with a short bounded queue.

Shared by every route of an upstream and placed just outside the attempt, so
a slot is held from the start of an attempt until its response body has been
streamed (released through ``ProxyResponse.on_release``).  At most
``max_active`` run; up to ``max_pending`` wait up to ``pending_timeout``;
beyond that the request is shed at once with 503 ``overflow``.

With ``concurrency.adaptive`` the limit is an ``AimdLimit`` under
``max_active``: each attempt's outcome (a drop: attempt timeout, connect
failure, 503, 429, or the deadline cutting it off; a success: any other
answer below 500) moves it, and a change is applied to admission at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.config import ConcurrencyConfig
from proxy.errors import Overflow, UpstreamConnectFailure, UpstreamTimeout
from proxy.policies.aimd import AimdLimit
from proxy.telemetry.metrics import UpstreamMetrics

_DROP_STATUSES: Final = frozenset({503, 429})


class Bulkhead:
    __slots__ = (
        "_abandoned", "_clock", "_gauge", "_max_active", "_max_pending", "_metrics", "_name", "_timeout", "_waiters",
        "active", "aimd", "pending",
    )

    def __init__(self, config: ConcurrencyConfig, name: str, metrics: UpstreamMetrics,
                 clock: Clock | None = None) -> None:
        self._max_active = config.max_active
        self._max_pending = config.max_pending
        self._timeout = config.pending_timeout
        self._metrics = metrics
        self._name = name
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._abandoned = 0  # cancelled waiters still in the deque, dropped lazily
        self.active = 0
        self.pending = 0
        self._clock = clock
        self.aimd: AimdLimit | None = None
        if config.adaptive is not None:
            if clock is None:
                raise ValueError("concurrency.adaptive needs a clock")
            # Set on the first attempt, not here: a reload that is then rejected must not show its limit.
            self._gauge: Any = None
            self.aimd = AimdLimit(config.adaptive, config.max_active, clock, self._limit_changed)
            self._max_active = self.aimd.limit

    def _limit_changed(self, limit: int) -> None:
        self._max_active = limit
        self._show(limit)
        waiters = self._waiters
        while self.active < limit and waiters:  # a raised limit admits queued attempts at once
            waiter = waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

    @property
    def has_room(self) -> bool:
        """An attempt would start now, without queueing (the hedge policy asks before sending one)."""
        return self.active < self._max_active and not self.pending

    def _reject(self, request: ProxyRequest, why: str) -> Overflow:
        self._metrics.bulkhead_rejected.inc()
        if request.span is not None:
            request.event("bulkhead_rejected", {"outrigger.reason": why})
        return Overflow(f"upstream {self._name} is at its concurrency limit ({why})")

    async def _wait_for_slot(self, request: ProxyRequest) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.pending += 1
        try:
            async with asyncio.timeout(self._timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot arrived as we gave up: pass it on
            else:
                waiter.cancel()
                self._forget_abandoned()
            if isinstance(exc, TimeoutError):
                raise self._reject(request, "pending timeout") from None
            raise
        finally:
            self.pending -= 1

    def _forget_abandoned(self) -> None:
        """Compact the queue once dead waiters outnumber the live ones it may hold.

        Waiters that timed out stay in the deque until a release pops them; when every slot is
        held for long (slow streams) they would pile up.  Compacting only after ``max_pending``
        of them keeps the cost amortised O(1) per request and the deque within 2x its bound.
        """
        self._abandoned += 1
        if self._abandoned > self._max_pending:
            self._waiters = deque(w for w in self._waiters if not w.done())
            self._abandoned = 0

    def _release(self) -> None:
        if self.active > self._max_active:  # the limit was cut: this slot goes away
            self.active -= 1
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over; `active` stays the same
                return
        self.active -= 1

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if self.active < self._max_active and not self.pending:
            self.active += 1
        elif self.pending < self._max_pending:
            await self._wait_for_slot(request)
        else:
            raise self._reject(request, "queue full")
        if self.aimd is not None:
            return await self._adaptive(request, call_next, self.aimd)
        try:
            response = await call_next(request)
        except BaseException:
            self._release()
            raise
        response.on_release(self._release)
        return response

    def _show(self, limit: int) -> None:
        if self._gauge is None:
            self._gauge = self._metrics.concurrency_limit()
        self._gauge.set(limit)

    async def _adaptive(self, request: ProxyRequest, call_next: Handler, aimd: AimdLimit) -> ProxyResponse:
        assert self._clock is not None
        if self._gauge is None:
            self._show(aimd.limit)
        started = self._clock.now()
        try:
            response = await call_next(request)
        except (UpstreamTimeout, UpstreamConnectFailure):
            self._release()
            aimd.on_drop(started)
            raise
        except BaseException:
            self._release()
            if request.deadline_expired:
                aimd.on_drop(started)  # the upstream did not answer within the request's deadline
            raise
        status = response.status
        if status in _DROP_STATUSES:
            aimd.on_drop(started)
        elif status < 500:
            aimd.on_success(self.active)
        response.on_release(self._release)
        return response
