"""The live endpoints of one upstream: one keep-alive pool each, picked per attempt.

``EndpointSet`` is the only writer of an upstream's endpoint list.  It
- applies updates (a static list at start and on reload, or what discovery
  resolved) as a diff: new endpoints get a pool (and ramp up through slow
  start, except those present at start); removed ones leave the rotation at
  once and their pool closes when their last in-flight request ends;
- picks an endpoint for an attempt among those not ejected, preferring ones
  the request has not tried (``retry.other_endpoint``);
- takes each attempt's outcome: latency into the endpoint's peak-EWMA,
  failures into outlier detection, which may eject the endpoint;
- keeps ``preconnect`` idle connections open per endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from proxy import errors
from proxy.clock import Clock
from proxy.config.types import UpstreamConfig
from proxy.tasks import cancel_and_wait
from proxy.telemetry.metrics import EndpointMetrics
from proxy.upstream.endpoints.balancer import picker
from proxy.upstream.endpoints.ewma import PeakEwma
from proxy.upstream.endpoints.outlier import OutlierDetector, OutlierTracker
from proxy.upstream.pool import H1Pool

__all__ = ["Endpoint", "EndpointSet", "format_address", "keep_warm"]

log = logging.getLogger("outrigger.endpoints")
_MIN_WEIGHT = 0.1  # a ramping endpoint still gets a trickle, so its first answers are seen
_OUTLIER_FAILURES = frozenset({"timeout", "reset", "connect_failure"})
_OUTLIER_STATUSES = frozenset({502, 503, 504})
_PENALISED_STATUSES = frozenset({429, 500, 502, 503, 504})
_PRECONNECT_INTERVAL_S = 1.0

PoolFactory = Callable[[str, int], H1Pool]


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def keep_warm(upstream: str, pools: Callable[[], Iterable[H1Pool]], wanted: int, connect_timeout_s: float,
                    rng: random.Random) -> None:
    """Top up each pool's idle connections to ``wanted``, about once a second, for ever."""
    while True:
        for pool in pools():
            try:
                await pool.preconnect(wanted, connect_timeout_s)
            except errors.ProxyError as exc:
                log.debug("upstream %s: preconnect failed: %s", upstream, exc)
        await asyncio.sleep(_PRECONNECT_INTERVAL_S * (0.8 + 0.4 * rng.random()))


class Endpoint:
    """One address of an upstream, with its pool, latency estimate and outlier state."""

    __slots__ = ("address", "ewma", "host", "pending", "pool", "port", "ramp_s", "removed", "since", "tracker")

    def __init__(self, host: str, port: int, pool: H1Pool, ewma: PeakEwma, tracker: OutlierTracker | None,
                 since: float, ramp_s: float) -> None:
        self.host = host
        self.port = port
        self.address = format_address(host, port)
        self.pool = pool
        self.ewma = ewma
        self.tracker = tracker
        self.pending = 0  # attempts picked and not yet finished (body streamed or failed)
        self.since = since  # joined (or returned from ejection at ``tracker.ejected_until``)
        self.ramp_s = ramp_s
        self.removed = False

    def ejected(self, now: float) -> bool:
        return self.tracker is not None and self.tracker.ejected_until > now

    def weight(self, now: float) -> float:
        if self.ramp_s <= 0:
            return 1.0
        start = self.since
        if self.tracker is not None and self.tracker.ejected_until > start:
            start = self.tracker.ejected_until  # back from ejection: ramp again from then
        ramped = (now - start) / self.ramp_s
        return 1.0 if ramped >= 1.0 else max(_MIN_WEIGHT, ramped)

    def state(self, now: float) -> str:
        if self.ejected(now):
            return "ejected"
        return "slow_start" if self.weight(now) < 1.0 else "healthy"

    def __repr__(self) -> str:
        return f"Endpoint({self.address})"


class EndpointSet:
    def __init__(self, upstream: str, config: UpstreamConfig, *, clock: Clock, rng: random.Random,
                 metrics: EndpointMetrics, pool_factory: PoolFactory, connect_timeout_s: float = 1.0) -> None:
        self.upstream = upstream
        self.config = config
        self._clock = clock
        self._rng = rng
        self._metrics = metrics
        self._pool_factory = pool_factory
        self._connect_timeout_s = connect_timeout_s
        self._picker = picker(config.load_balancer, rng)
        self._outliers = OutlierDetector(config.outlier_detection, clock) if config.outlier_detection else None
        self.endpoints: list[Endpoint] = []
        self._live: list[Endpoint] = []  # not ejected, as of the last refresh
        self._live_until = math.inf  # when the next ejection ends and ``_live`` must be recomputed
        self._started = False
        self._closing: set[Endpoint] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._preconnect: asyncio.Task[None] | None = None

    # --- membership ---

    def update(self, addresses: Sequence[tuple[str, int]]) -> None:
        """Make the set ``addresses``: keep what stays, add what is new, drain what left."""
        wanted = {format_address(host, port): (host, port) for host, port in addresses}
        if not wanted:
            log.warning("upstream %s: no endpoints in the update; keeping the last set", self.upstream)
            return
        now = self._clock.now()
        current = {endpoint.address: endpoint for endpoint in self.endpoints}
        ramp = self.config.slow_start
        since = now if self._started else now - ramp  # the first set serves at full weight at once
        kept = [endpoint for address, endpoint in current.items() if address in wanted]
        added = [Endpoint(host, port, self._pool_factory(host, port),
                          PeakEwma(self._clock), self._outliers.tracker() if self._outliers else None,
                          since, ramp)
                 for address, (host, port) in wanted.items() if address not in current]
        removed = [endpoint for address, endpoint in current.items() if address not in wanted]
        self.endpoints = kept + added
        for endpoint in removed:
            endpoint.removed = True
            self._metrics.forget(endpoint.address)
            if endpoint.pending == 0:
                self._close_pool(endpoint)
            else:
                self._closing.add(endpoint)  # closed by ``finish`` when its last request ends
        self._refresh(now)
        self._started = True
        if added or removed:
            log.info("upstream %s endpoints: %d (+%d -%d)", self.upstream, len(self.endpoints), len(added),
                     len(removed), extra={"endpoints": [e.address for e in self.endpoints]})

    def _refresh(self, now: float) -> None:
        live = [endpoint for endpoint in self.endpoints if not endpoint.ejected(now)]
        self._live = live
        ends = [e.tracker.ejected_until for e in self.endpoints if e.tracker is not None and e.ejected(now)]
        self._live_until = min(ends) if ends else math.inf

    def _close_pool(self, endpoint: Endpoint) -> None:
        self._spawn(endpoint.pool.close())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- per attempt ---

    def pick(self, tried: Sequence[object] | None) -> Endpoint:
        now = self._clock.now()
        if now >= self._live_until:
            self._refresh(now)
        live = self._live
        if not live:
            host = self.config.url
            raise errors.UpstreamConnectFailure(f"upstream {self.upstream} has no endpoints ({host} resolved to "
                                                "no address yet)")
        if tried:
            fresh = [endpoint for endpoint in live if endpoint not in tried]
            if fresh:
                live = fresh
        endpoint: Endpoint = self._picker.pick(live, now)  # type: ignore[assignment]
        endpoint.pending += 1
        return endpoint

    def finish(self, endpoint: Endpoint) -> None:
        """The attempt on ``endpoint`` is over (its body was streamed, or it failed)."""
        endpoint.pending -= 1
        if endpoint.removed and endpoint.pending == 0 and endpoint in self._closing:
            self._closing.discard(endpoint)
            self._close_pool(endpoint)

    def record(self, endpoint: Endpoint, result: str, status: int | None, rtt_s: float) -> None:
        """One attempt's outcome: latency, penalty and outlier detection."""
        if result in _OUTLIER_FAILURES or (status is not None and status in _PENALISED_STATUSES):
            endpoint.ewma.penalise()
        else:
            endpoint.ewma.observe(rtt_s)
        if not endpoint.removed:
            self._metrics.attempt(endpoint.address, result)
        tracker, outliers = endpoint.tracker, self._outliers
        if tracker is None or outliers is None or endpoint.removed:
            return
        failure = result in _OUTLIER_FAILURES or (status is not None and status in _OUTLIER_STATUSES)
        reason = outliers.record(tracker, failure)
        if reason is None:
            return
        now = self._clock.now()
        if endpoint.ejected(now):
            return
        ejected = sum(1 for e in self.endpoints if e.ejected(now))
        if not outliers.may_eject(ejected, len(self.endpoints)):
            return
        duration = outliers.eject(tracker)
        self._metrics.ejected(reason)
        self._refresh(now)
        log.warning("upstream %s: ejected endpoint %s for %.0fs (%s)", self.upstream, endpoint.address,
                    duration, reason.replace("_", " "),
                    extra={"upstream": self.upstream, "endpoint": endpoint.address, "reason": reason})

    # --- lifecycle and status ---

    async def start(self, initial: Sequence[tuple[str, int]]) -> None:
        self._metrics.watch(self.count)
        if initial:
            self.update(initial)
        self._started = True
        if self.config.preconnect > 0:
            self._preconnect = asyncio.get_running_loop().create_task(self._keep_warm())

    def _warm_pools(self) -> list[H1Pool]:
        now = self._clock.now()
        return [endpoint.pool for endpoint in self.endpoints if not endpoint.ejected(now)]

    async def _keep_warm(self) -> None:
        await keep_warm(self.upstream, self._warm_pools, self.config.preconnect, self._connect_timeout_s, self._rng)

    async def close(self) -> None:
        await cancel_and_wait(self._preconnect)
        for endpoint in [*self.endpoints, *self._closing]:
            await endpoint.pool.close()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await task
        self._metrics.close()

    def count(self, state: str) -> int:
        now = self._clock.now()
        return sum(1 for endpoint in self.endpoints if endpoint.state(now) == state)

    def status(self) -> list[dict[str, Any]]:
        now = self._clock.now()
        out = []
        for endpoint in self.endpoints:
            entry: dict[str, Any] = {
                "address": endpoint.address, "state": endpoint.state(now), "pending": endpoint.pending,
                "ewma_ms": round(endpoint.ewma.current(now) * 1000, 3),
                "weight": round(endpoint.weight(now), 3), "idle_connections": endpoint.pool.idle_count,
            }
            if endpoint.tracker is not None:
                entry["ejections"] = endpoint.tracker.ejections
                if endpoint.ejected(now):
                    entry["ejected_for_s"] = round(endpoint.tracker.ejected_until - now, 1)
            out.append(entry)
        return out
