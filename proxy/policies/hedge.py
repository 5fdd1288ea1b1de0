"""Hedging: when an attempt is slow to answer, send a backup and take the first response head.

Sits inside the retry policy and outside the circuit breaker, bulkhead,
attempt telemetry and attempt timeout (see ``proxy.app``): each hedge is an
attempt of its own (asked of the breaker, holding a bulkhead slot, with its
own CLIENT span marked ``outrigger.hedge=true`` and its own per-try timeout),
and the retry policy sees one answer per round, the winner's.

A hedge goes out ``delay`` after the first try (``auto``: the route's
observed ``percentile`` latency, once the sketch has ``min_samples``) while
no try has answered, up to ``max_hedges`` per round, only when all hold:

* the request may be sent twice: an idempotent method or an
  ``Idempotency-Key``, and a body buffered whole (every copy sends the same
  bytes);
* the breaker would admit it and the bulkhead has a free slot (a hedge into
  a queue only adds load to a saturated upstream);
* hedges stay within ``max_extra_load`` of the route's requests, however
  slow the upstream gets (in a partial outage hedging all would double the
  load): each request earns ``max_extra_load`` of a hedge token, a hedge
  spends one, and at most ``max(1, 100 x max_extra_load)`` tokens are banked,
  so over any stretch of N requests hedges are at most
  ``max_extra_load x N`` plus that bank (a quiet hour cannot save up for a
  burst of hedges in an outage);
* the retry budget has a token (hedges and retries share it).

A hedge that was due and not sent counts as ``suppressed``.  The first
response head wins (``won`` when it is a hedge's); a try that fails leaves
the others running, and the round fails only when all have.  Losers are
cancelled, which closes their connection, when the pool has spare
connections; otherwise they are left to finish and their response is read
to its end and released (the connection stays pooled), up to a bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.config.types import HedgeConfig
from proxy.policies.budget import RetryBudget
from proxy.policies.latency import LatencySketch
from proxy.telemetry.metrics import RouteMetrics

__all__ = ["Hedge", "HedgeTokens"]

_DRAIN_BYTES = 1 << 20  # a loser left to finish is read to its end up to this, else its connection is closed
_DRAIN_S = 5.0


class HedgeTokens:
    """The ``max_extra_load`` cap: a token bucket filled by requests, not by time."""

    __slots__ = ("_ratio", "capacity", "tokens")

    def __init__(self, ratio: float) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"max_extra_load must be in (0, 1], got {ratio!r}")
        self._ratio = ratio
        self.capacity = max(1.0, 100.0 * ratio)
        self.tokens = 0.0

    def record_request(self) -> None:
        tokens = self.tokens + self._ratio
        self.tokens = tokens if tokens < self.capacity else self.capacity

    def spend(self) -> None:
        self.tokens -= 1.0


class Hedge:
    __slots__ = (
        "_background", "_budget", "_clock", "_delay", "_extra", "_gate", "_max_hedges", "_min_samples",
        "_percentile", "_record_requests", "_results", "_room", "_sketch", "_spare",
    )

    def __init__(self, config: HedgeConfig, *, sketch: LatencySketch | None, min_samples: int, budget: RetryBudget,
                 record_requests: bool, clock: Clock, metrics: RouteMetrics,
                 spare: Callable[[], int], gate: Callable[[], bool] | None = None,
                 room: Callable[[], bool] | None = None) -> None:
        """``budget`` is the route's retry budget (``record_requests``: no retry policy counts requests
        into it, so this one does); ``spare()`` is the pool's connections to be had without waiting;
        ``gate()`` the breaker's ``would_admit``; ``room()`` whether the bulkhead has a free slot."""
        self._delay = config.delay_s
        if self._delay is None and sketch is None:
            raise ValueError("hedge.delay auto needs the route's latency sketch")
        self._percentile = config.percentile
        self._max_hedges = config.max_hedges
        self._sketch = sketch
        self._min_samples = min_samples
        self._budget = budget
        self._extra = HedgeTokens(config.max_extra_load)
        self._record_requests = record_requests
        self._clock = clock
        self._results = metrics.hedge_results()
        self._spare = spare
        self._gate = gate
        self._room = room
        self._background: set[asyncio.Task[Any]] = set()

    def delay(self) -> float | None:
        """Seconds to wait before hedging; None while ``auto`` has too few samples to go by."""
        if self._delay is not None:
            return self._delay
        sketch = self._sketch
        assert sketch is not None
        if sketch.count() < self._min_samples:
            return None
        return sketch.quantile(self._percentile)

    def snapshot(self) -> dict[str, Any]:
        delay = self.delay()
        return {"delay_s": None if delay is None else round(delay, 6), "auto": self._delay is None,
                "hedge_tokens": round(self._extra.tokens, 3)}

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        self._extra.record_request()
        if self._record_requests:
            self._budget.record_request()
        if not request.idempotent or request.body.stream is not None:
            return await call_next(request)
        delay = self.delay()
        if delay is None or self._clock.now() + delay >= request.deadline:
            return await call_next(request)
        return await self._race(request, call_next, delay)

    def _admit(self, request: ProxyRequest) -> bool:
        """The breaker and bulkhead first (they cost nothing), then the two token schemes."""
        reason = None
        if self._gate is not None and not self._gate():
            reason = "circuit_open"
        elif self._room is not None and not self._room():
            reason = "bulkhead_full"
        elif self._extra.tokens < 1.0:
            reason = "max_extra_load"
        elif not self._budget.try_withdraw():
            reason = "retry_budget"
        if reason is None:
            self._extra.spend()
            return True
        self._results["suppressed"].inc()
        if request.span is not None:
            request.event("hedge_suppressed", {"outrigger.reason": reason})
        return False

    async def _race(self, request: ProxyRequest, call_next: Handler, delay_s: float) -> ProxyResponse:
        pending: set[asyncio.Future[ProxyResponse]] = {asyncio.ensure_future(call_next(request))}
        forks: dict[asyncio.Future[ProxyResponse], ProxyRequest] = {}  # the hedges
        due = 0
        error: BaseException | None = None
        winner: asyncio.Future[ProxyResponse] | None = None
        try:
            while winner is None:
                done, _ = await asyncio.wait(pending, timeout=delay_s if due < self._max_hedges else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:  # `delay_s` passed and no try answered
                    due += 1
                    if self._admit(request):
                        fork = request.fork()
                        fork.hedge = True
                        if request.span is not None:
                            request.event("hedge", {"outrigger.delay_s": delay_s, "outrigger.hedge": due})
                        hedge = asyncio.ensure_future(call_next(fork))
                        forks[hedge] = fork
                        pending.add(hedge)
                    continue
                for task in done:
                    pending.discard(task)
                    failure = task.exception()
                    if failure is not None:
                        error = failure
                    elif winner is None:
                        winner = task
                    else:
                        self._discard(task)  # answered in the same instant as the winner
                if winner is None and not pending:
                    assert error is not None
                    raise error
        except asyncio.CancelledError:
            for loser in pending:  # the request is over (deadline, app gone): no try outlives it
                loser.cancel()
                loser.add_done_callback(_retrieve)
            raise
        finally:
            for sent in forks:
                self._results["won" if sent is winner else "lost"].inc()
        for loser in pending:
            self._drop(loser)
        assert winner is not None
        hedged = forks.get(winner)
        if hedged is not None:
            request.upstream_s += hedged.upstream_s
        return winner.result()

    def _drop(self, task: asyncio.Future[ProxyResponse]) -> None:
        """A loser: cancelled (closing its connection) only when the pool can spare one, else left to finish."""
        if self._spare() > 0:
            task.cancel()
            task.add_done_callback(_retrieve)
        else:
            task.add_done_callback(self._discard)

    def _discard(self, task: asyncio.Future[ProxyResponse]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        drain = asyncio.get_running_loop().create_task(_drain(task.result()))
        self._background.add(drain)
        drain.add_done_callback(self._background.discard)


def _retrieve(task: asyncio.Future[ProxyResponse]) -> None:
    """A cancelled try may still end in an error of its own (a timer that fired with the cancel): read it,
    so asyncio does not log it as never retrieved; release an answer that beat the cancel."""
    if task.cancelled():
        return
    if task.exception() is None:
        task.result().close()


async def _drain(response: ProxyResponse) -> None:
    """Read a losing response to its end so its connection goes back to the pool; close it when too big or slow."""
    upstream = response.upstream
    try:
        if upstream is not None:
            size = 0
            async with asyncio.timeout(_DRAIN_S):
                while chunk := await upstream.read():
                    size += len(chunk)
                    if size > _DRAIN_BYTES:
                        response.close()
                        return
    except asyncio.CancelledError:
        response.close()
        raise
    except Exception:
        response.close()
        return
    response.release()
