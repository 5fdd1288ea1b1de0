"""The one place where config becomes pools, policies, chains and routers.

``build_runtime`` turns a validated ``Config`` into a ``Runtime``: one
connection pool, breaker and bulkhead per upstream, one policy chain per
route, one router per listener.  Chains are built here, once, never per
request.  On hot reload the previous runtime is passed in and stateful
pieces (pools, breakers, budgets, limiters) are carried over wherever their
config did not change.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from proxy.chain import Policy, build_chain
from proxy.clock import Clock
from proxy.config import Config, ListenerConfig, RouteConfig, UpstreamConfig, config_hash
from proxy.edge.routing import Route, Router
from proxy.policies.adaptive_timeout import AdaptiveTimeout
from proxy.policies.backoff import backoff_from_config
from proxy.policies.breaker_state import BreakerState, CircuitBreaker
from proxy.policies.budget import RetryBudget
from proxy.policies.bulkhead import Bulkhead
from proxy.policies.circuit_breaker import CircuitBreakerPolicy
from proxy.policies.deadline import Deadline
from proxy.policies.fallback import Fallback
from proxy.policies.global_rate_limit import GlobalRateLimit
from proxy.policies.hedge import Hedge
from proxy.policies.idempotency import Idempotency
from proxy.policies.latency import LatencySketch
from proxy.policies.rate_limit import RateLimit
from proxy.policies.retry import Retry
from proxy.policies.route_state import RouteState
from proxy.policies.stale_resend import StaleResend
from proxy.policies.timeout import AttemptTimeout
from proxy.store.records import LocalRecords
from proxy.telemetry.attempts import AttemptTelemetry
from proxy.telemetry.breaker_events import BreakerEvents, iso_time
from proxy.telemetry.metrics import BreakerMetrics, Metrics, UpstreamMetrics
from proxy.telemetry.shared_state import IdempotencyMetrics, LimitMetrics
from proxy.telemetry.tracing import Tracing
from proxy.timers import TimerWheel
from proxy.upstream.call import UpstreamCall, UpstreamPool
from proxy.upstream.endpoints.policy import Balance

if TYPE_CHECKING:  # redis-py is imported only when the config has a `redis:` block
    from proxy.deadletter.spool import Spool
    from proxy.store.redis import RedisStore

__all__ = ["Runtime", "build_runtime"]

_SKETCH_WINDOW_S = 30.0  # the latency window of a route that hedges at `auto` without an adaptive timeout
_HEDGE_MIN_SAMPLES = 50  # ...and the samples it needs before `auto` has a delay to go by


@dataclass(slots=True)
class UpstreamRuntime:
    pool: UpstreamPool
    breaker: CircuitBreaker | None
    bulkhead: Bulkhead
    metrics: UpstreamMetrics


@dataclass(slots=True)
class Runtime:
    config: Config
    version: str
    upstreams: dict[str, UpstreamRuntime]
    routers: dict[str, Router]  # by listener name
    routes: list[Route] = field(default_factory=list)
    new_pools: list[UpstreamPool] = field(default_factory=list)  # to start()
    new_breakers: list[tuple[CircuitBreaker, BreakerMetrics]] = field(default_factory=list)  # shown once in service
    retired_pools: list[UpstreamPool] = field(default_factory=list)  # to close() after in-flight finish
    # Kept pools whose static endpoint list changed: the new list is diffed in once in service.
    endpoint_updates: list[tuple[UpstreamPool, UpstreamConfig]] = field(default_factory=list)
    breaker_events: BreakerEvents = field(default_factory=BreakerEvents)  # carried over by reloads
    spool: Spool | None = None  # the dead-letter spool (top-level dead_letter), shared by its routes
    retired_spool: Spool | None = None  # the previous one, when a reload changed or removed it; to close()
    redis: RedisStore | None = None  # the shared store (top-level `redis:`), kept across reloads while unchanged
    retired_redis: RedisStore | None = None  # the previous one, when a reload changed `redis:`; to close()
    # The one timer wheel of the sidecar's event loop, for every route's deadline and attempt
    # timeout; carried over by reloads, so requests of old and new chains share it.
    timers: TimerWheel = field(default_factory=TimerWheel)

    def global_limits(self) -> set[str]:
        """The names of the global rate limits this runtime's routes take from its store (``self.redis``)."""
        return {limiter.name for route in self.routes
                if isinstance(limiter := route.state.rate_limit, GlobalRateLimit) and limiter.store is self.redis}

    def status(self, clock: Clock) -> dict[str, Any]:
        """Runtime state for /status: integer counts, seconds rounded, ISO times, routes keyed as in metrics."""
        upstreams = {}
        for name, up in self.upstreams.items():
            upstreams[name] = {
                "url": up.pool.config.url,
                "active": up.bulkhead.active,
                "pending": up.bulkhead.pending,
                "circuit_breaker": _breaker_status(up.breaker, clock) if up.breaker is not None else None,
            }
            if up.pool.endpoints is not None:
                upstreams[name]["load_balancer"] = up.pool.config.load_balancer
                upstreams[name]["endpoints"] = up.pool.endpoints.status()
                if up.pool.discovery is not None:
                    upstreams[name]["discovery"] = {"host": up.pool.host, "last_error": up.pool.discovery.last_error}
            if up.bulkhead.aimd is not None:
                upstreams[name]["concurrency_limit"] = up.bulkhead.aimd.limit
        routes = {}
        for route in self.routes:
            bulkhead = self.upstreams[route.upstream].bulkhead  # per upstream, shared by its routes
            entry: dict[str, Any] = {"listener": route.listener, "upstream": route.upstream,
                                     "http_route": route.prefix, **route.metrics.live.snapshot(),
                                     "active": bulkhead.active, "pending": bulkhead.pending}
            state = route.state
            if state.rate_limit is not None:
                entry["rate_limit"] = state.rate_limit.snapshot()
            if state.retry is not None:
                # whole retries the budget would allow now
                entry["retry_budget_remaining"] = int(state.retry.budget.remaining())
            if state.circuit_breaker is not None and route.config.circuit_breaker.scope == "route":
                entry["circuit_breaker"] = _breaker_status(state.circuit_breaker, clock)
            # learned values (docs/adaptive.md)
            if state.adaptive_timeout is not None:
                entry["adaptive_timeout"] = state.adaptive_timeout.snapshot()
            if state.hedge is not None:
                entry["hedge"] = state.hedge.snapshot()
            routes[route.name] = entry  # the `route` label of the metrics (route names are unique)
        status = {"version": self.version, "upstreams": upstreams, "routes": routes,
                  "breaker_transitions": list(self.breaker_events.recent)}
        if self.spool is not None:
            status["dead_letter"] = self.spool.snapshot()
        if self.redis is not None:
            status["redis"] = self.redis.snapshot()
        return status


def _redis_records(store: RedisStore | None) -> Any:
    from proxy.store.redis_records import RedisRecords
    return RedisRecords(_need(store))


def _need(store: RedisStore | None) -> RedisStore:
    if store is None:  # the loader refuses scope: global and store: redis without redis.url
        raise ValueError("this route needs the top-level redis block")
    return store


def _breaker_status(breaker: CircuitBreaker, clock: Clock) -> dict[str, Any]:
    """The breaker's snapshot: state-entry time as ISO 8601, seconds rounded, window counts as integers."""
    snapshot = dict(breaker.snapshot())
    entered_wall = time.time() - (clock.now() - breaker.entered_at)
    snapshot["entered_at"] = iso_time(entered_wall)
    snapshot["seconds_in_state"] = round(clock.now() - breaker.entered_at, 1)
    snapshot["retry_after"] = round(float(snapshot["retry_after"]), 1)  # type: ignore[arg-type]
    for key in ("failure_rate", "slow_call"):
        window = snapshot.get(key)
        if isinstance(window, dict):
            snapshot[key] = {name: round(value, 3) if name == "rate" else int(value) for name, value in window.items()}
    snapshot.pop("open_until", None)
    return snapshot


def _breaker(config: Any, clock: Clock, rng: random.Random, metrics: BreakerMetrics,
             runtime: Runtime) -> CircuitBreaker:
    events = runtime.breaker_events

    def on_transition(old: BreakerState, new: BreakerState) -> None:
        metrics.transition(old.value, new.value)
        events.transition(metrics.upstream, breaker, old, new)  # the log line and /status's recent list
    breaker = CircuitBreaker(config, clock, rng, on_transition)
    runtime.new_breakers.append((breaker, metrics))
    return breaker


class _Carry:
    """Stateful pieces of the previous runtime, reused when their config is unchanged."""

    def __init__(self, previous: Runtime | None) -> None:
        self.upstreams = previous.upstreams if previous else {}
        self.routes = {(r.listener, r.name): r for r in previous.routes} if previous else {}

    def unchanged(self, key: tuple[str, str], config: RouteConfig, block: str) -> RouteState | None:
        """The route's previous state when its ``block`` and its upstream are as before, else None."""
        old = self.routes.get(key)
        if old is not None and getattr(old.config, block) == getattr(config, block) \
                and old.config.upstream == config.upstream:
            return old.state
        return None


def _spool(config: Config, metrics: Metrics) -> Spool:
    from proxy.deadletter.spool import Spool  # only now: a config without dead letters never loads the spool
    assert config.dead_letter is not None
    return Spool(config.dead_letter, metrics)


def build_runtime(config: Config, *, metrics: Metrics, tracing: Tracing | None, clock: Clock,
                  rng: random.Random, previous: Runtime | None = None) -> Runtime:
    carry = _Carry(previous)
    runtime = Runtime(config=config, version=config_hash(config), upstreams={}, routers={})
    if previous is not None:
        runtime.breaker_events = previous.breaker_events
        runtime.timers = previous.timers
    old_spool = previous.spool if previous is not None else None
    if config.dead_letter is not None:  # one spool per process: kept across reloads that leave it unchanged
        runtime.spool = old_spool if old_spool is not None and old_spool.config == config.dead_letter \
            else _spool(config, metrics)
    if old_spool is not None and old_spool is not runtime.spool:
        runtime.retired_spool = old_spool  # its thread ends once in-flight requests are done with it
    old_redis = previous.redis if previous is not None else None
    if config.redis is not None:
        from proxy.store.redis import RedisStore  # only now: a config without Redis never loads redis-py
        same = old_redis is not None and old_redis.config == config.redis
        runtime.redis = old_redis if same else RedisStore(config.redis, clock, rng)
    if old_redis is not None and old_redis is not runtime.redis:
        runtime.retired_redis = old_redis
    try:
        _build_routing(config, runtime, carry, metrics=metrics, tracing=tracing, clock=clock, rng=rng)
    except BaseException:
        _abandon(runtime, previous)
        raise
    return runtime


def _abandon(runtime: Runtime, previous: Runtime | None) -> None:
    """A build that failed partway: the spool and Redis store it made (not the previous runtime's) are
    stopped, so no writer thread or heartbeat outlives it.  (Heartbeats it started on the previous
    runtime's store are the reloader's to stop: ``RedisStore.retain``.)"""
    spool = runtime.spool
    if spool is not None and (previous is None or spool is not previous.spool):
        spool.close()  # nothing was submitted to it: the writer ends at once
    store = runtime.redis
    if store is not None and (previous is None or store is not previous.redis):
        store.abandon()


def _build_routing(config: Config, runtime: Runtime, carry: _Carry, *, metrics: Metrics, tracing: Tracing | None,
                   clock: Clock, rng: random.Random) -> None:
    """The upstreams (new pools, or the previous ones carried over) and every listener's routes."""
    for name, upstream in config.upstreams.items():
        old = carry.upstreams.get(name)
        if old is not None and old.pool.config == upstream:
            runtime.upstreams[name] = old  # same pool, breaker and bulkhead: state carries over
        elif old is not None and old.pool.endpoints is not None and upstream.endpoints is not None \
                and msgspec.structs.replace(old.pool.config, endpoints=upstream.endpoints) == upstream:
            # Only the static endpoint list changed: the set is diffed in place once the runtime is
            # in service, so kept endpoints keep their connections, latency and outlier state.
            runtime.upstreams[name] = old
            runtime.endpoint_updates.append((old.pool, upstream))
        else:
            runtime.upstreams[name] = _build_upstream(name, upstream, old, runtime, metrics=metrics, clock=clock,
                                                      rng=rng, connect_timeout_s=config.defaults.timeout.connect)
            runtime.new_pools.append(runtime.upstreams[name].pool)
    for old_name, old in carry.upstreams.items():
        if runtime.upstreams.get(old_name) is not old:
            runtime.retired_pools.append(old.pool)
    for listener in config.listeners:
        routes = [_build_route(listener, route, runtime, carry, metrics=metrics, tracing=tracing, clock=clock,
                               rng=rng) for route in listener.routes]
        runtime.routes.extend(routes)
        runtime.routers[listener.name] = Router(routes)


def _build_upstream(name: str, config: UpstreamConfig, old: UpstreamRuntime | None, runtime: Runtime, *,
                    metrics: Metrics, clock: Clock, rng: random.Random, connect_timeout_s: float) -> UpstreamRuntime:
    """A new pool; breaker and bulkhead are kept from ``old`` when their blocks did not change."""
    breaker_config, concurrency = config.circuit_breaker, config.concurrency
    assert breaker_config is not None and concurrency is not None  # resolved by the loader
    up_metrics = old.metrics if old is not None else metrics.for_upstream(name)
    breaker = old.breaker if old is not None and old.pool.config.circuit_breaker == breaker_config else (
        _breaker(breaker_config, clock, rng, metrics.for_breaker(name), runtime) if breaker_config.enabled else None)
    bulkhead = old.bulkhead if old is not None and old.pool.config.concurrency == concurrency else (
        Bulkhead(concurrency, name, up_metrics, clock))
    pool = UpstreamPool(name, config, clock=clock, rng=rng, endpoint_metrics=metrics.for_endpoints(name),
                        connect_timeout_s=connect_timeout_s)
    return UpstreamRuntime(pool, breaker, bulkhead, up_metrics)


def _latency_sketch(key: tuple[str, str], config: RouteConfig, carry: _Carry, clock: Clock) -> LatencySketch | None:
    """The route's latency sketch (per route and upstream; per endpoint once upstreams have several),
    kept across a reload that leaves its upstream and window alone; None when nothing reads it."""
    adaptive = config.timeout.adaptive
    if adaptive is None and (config.hedge is None or config.hedge.delay_s is not None):
        return None
    window = adaptive.window if adaptive is not None else _SKETCH_WINDOW_S
    old = carry.routes.get(key)
    sketch = old.state.latency if old is not None and old.config.upstream == config.upstream else None
    return sketch if sketch is not None and sketch.window_s == window else LatencySketch(window, clock)


def _build_route(listener: ListenerConfig, config: RouteConfig, runtime: Runtime, carry: _Carry, *,
                 metrics: Metrics, tracing: Tracing | None, clock: Clock, rng: random.Random) -> Route:
    upstream = runtime.upstreams[config.upstream]
    route_metrics = metrics.for_route(config.name, config.upstream)
    key = (listener.name, config.name)
    state = RouteState()  # filled below with the chain's stateful parts
    policies: list[Policy] = []

    # Dead letter: outermost, outside even fallback, so it sees only final outcomes (after every
    # retry, refusal and fallback) and its header reaches the app on a fallback response too.
    if config.dead_letter is not None and runtime.spool is not None:
        from proxy.deadletter.policy import DeadLetter  # loaded only where a route spools
        policies.append(DeadLetter(config.dead_letter, runtime.spool, route=config.name, listener=listener.name,
                                   prefix=config.match.path_prefix, rewrite_prefix=config.rewrite_prefix,
                                   metrics=metrics))

    # Fallback: outermost but for dead letter, so it can stand in for an error raised anywhere below it.
    if config.fallback is not None:
        policies.append(Fallback(config.fallback))

    # Idempotency: inside the fallback (whose answers are not stored) and outside the rate limit,
    # so a replayed response costs no token and never reaches the upstream.
    if config.idempotency is not None:
        previous = carry.unchanged(key, config, "idempotency")
        old_idem = previous.idempotency if previous is not None else None
        if old_idem is not None and config.idempotency.store == "redis" \
                and getattr(old_idem.store, "store", None) is not runtime.redis:
            old_idem = None  # its Redis store was replaced by this reload
        if old_idem is None:
            records = LocalRecords(clock) if config.idempotency.store == "local" else _redis_records(runtime.redis)
            old_idem = Idempotency(config.idempotency, config.name, records, clock,
                                   IdempotencyMetrics(metrics, config.name), lock_ttl_s=config.timeout.total + 1.0)
        policies.append(old_idem)
        state.idempotency = old_idem

    # Rate limit: before anything else spends work, so rejected requests cost
    # no deadline, budget, breaker probe or connection.
    if config.rate_limit is not None:
        previous = carry.unchanged(key, config, "rate_limit")
        limiter: RateLimit | GlobalRateLimit | None = previous.rate_limit if previous is not None else None
        if limiter is not None and getattr(limiter, "store", runtime.redis) is not runtime.redis:
            limiter = None  # a global limit on a store this reload replaced
        if limiter is None and config.rate_limit.scope == "global":
            # Shared by every sidecar with the same limit name: tokens leased from Redis.
            limiter = GlobalRateLimit(config.rate_limit, config.name, _need(runtime.redis), clock, route_metrics,
                                      LimitMetrics(metrics, config.name))
        limiter = limiter or RateLimit(config.rate_limit, clock, route_metrics, metrics.rate_limit_shadowed.labels(
            route=config.name) if config.rate_limit.shadow else None)
        policies.append(limiter)
        state.rate_limit = limiter

    # Deadline (total timeout): outside retry, so one clock bounds all tries and backoff.
    policies.append(Deadline(config.timeout.total, clock, route_metrics, runtime.timers))

    # The route's breaker: the upstream's, or its own with `scope: route`.
    breaker = upstream.breaker
    cb = config.circuit_breaker
    if cb.enabled and cb.scope == "route":
        previous = carry.unchanged(key, config, "circuit_breaker")
        old = previous.circuit_breaker if previous is not None else None
        breaker = old if old is not None else _breaker(
            cb, clock, rng, metrics.for_breaker(f"{config.upstream}/{config.name}"), runtime)
    if not cb.enabled:
        breaker = None

    # Retry: outside the breaker and bulkhead, so each attempt is gated and counted separately;
    # it asks the breaker first, so a retry it would refuse does not replace the last answer.
    previous = carry.unchanged(key, config, "retry")
    old_retry = previous.retry if previous is not None else None
    budget = old_retry.budget if old_retry is not None else RetryBudget.from_config(config.retry.budget, clock)
    retry = Retry(config.retry, budget=budget, backoff=backoff_from_config(config.retry.backoff, rng),
                  clock=clock, metrics=route_metrics, gate=breaker.would_admit if breaker is not None else None)
    state.retry = retry
    if config.retry.max_attempts > 1:
        policies.append(retry)

    # Hedge: inside retry, which sees one answer per round (the winner's) and shares its budget with
    # it; outside the breaker, bulkhead, attempt telemetry and attempt timeout, so each hedge is an
    # attempt of its own: asked of the breaker, holding a slot, with its own CLIENT span and per-try timeout.
    sketch = _latency_sketch(key, config, carry, clock)
    if config.hedge is not None:
        adaptive_config = config.timeout.adaptive
        bulkhead = upstream.bulkhead
        hedge = Hedge(config.hedge, sketch=sketch, budget=budget,
                      min_samples=adaptive_config.min_samples if adaptive_config else _HEDGE_MIN_SAMPLES,
                      record_requests=config.retry.max_attempts == 1, clock=clock, metrics=route_metrics,
                      spare=lambda: upstream.pool.h1.spare, gate=breaker.would_admit if breaker else None,
                      room=lambda: bulkhead.has_room)
        policies.append(hedge)
        state.hedge = hedge

    # Circuit breaker: per attempt, so a retry is never sent to an open upstream;
    # outside the bulkhead, so fast-fails take no concurrency slot.
    if breaker is not None:
        breaker_policy = CircuitBreakerPolicy(breaker, cb.failure_status_codes, clock,
                                              f"upstream {config.upstream}")
        policies.append(breaker_policy)
        state.circuit_breaker = breaker_policy.breaker

    # Bulkhead: per upstream and per attempt; holds the slot until the body is streamed.
    policies.append(upstream.bulkhead)

    # Balance (upstreams with several endpoints only): picks each attempt's endpoint, so a retry can go
    # elsewhere; inside the breaker and bulkhead, which guard the upstream as a whole, and outside
    # attempt telemetry, so the attempt's span and metrics can name the endpoint.
    endpoints = upstream.pool.endpoints
    if endpoints is not None:
        policies.append(Balance(endpoints, clock, other_endpoint=config.retry.other_endpoint))

    # Stale-connection resend: inside breaker and bulkhead (the keep-alive race is no upstream
    # failure, and the resend keeps the slot), outside telemetry (the resend is a counted attempt).
    policies.append(StaleResend(max_attempts=config.retry.max_attempts, budget=budget, metrics=route_metrics))

    # Attempt telemetry: sees exactly the attempts that go out, and how each ended.
    policies.append(AttemptTelemetry(route=config.name, pool=upstream.pool, metrics=route_metrics,
                                     clock=clock, tracing=tracing))

    # Attempt timeout: innermost, so it times one try up to response headers; it also feeds the
    # route's latency sketch, since it alone sees each try's time to headers and whether it cut it off.
    adaptive = None
    if sketch is not None:
        state.latency = sketch
        if config.timeout.adaptive is not None:
            adaptive = AdaptiveTimeout(config.timeout.adaptive, config.timeout.attempt, sketch,
                                       route_metrics.adaptive_timeout)
            state.adaptive_timeout = adaptive
    policies.append(AttemptTimeout(config.timeout.attempt, config.upstream, route_metrics, runtime.timers,
                                   adaptive=adaptive,
                                   sketch=sketch, clock=clock))

    handler = build_chain(policies, UpstreamCall(upstream.pool, config.timeout, clock))
    # Bodies are buffered for replay only when the route can retry or hedge at all (or to fingerprint
    # an idempotent one).
    buffer_limit = config.retry.buffer_limit if config.retry.max_attempts > 1 or config.hedge \
        or config.idempotency else 0
    if config.dead_letter is not None:  # ... or when a failure may be spooled, up to dead_letter.max_body
        buffer_limit = max(buffer_limit, int(config.dead_letter.max_body))
    return Route(name=config.name, listener=listener.name, config=config, pool=upstream.pool, handler=handler,
                 metrics=route_metrics, buffer_limit=buffer_limit, state=state)
