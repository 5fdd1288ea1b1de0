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
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from proxy.chain import Policy, build_chain
from proxy.clock import Clock
from proxy.config import Config, ListenerConfig, RouteConfig, UpstreamConfig, config_hash
from proxy.policies.backoff import backoff_from_config
from proxy.policies.breaker import BreakerState, CircuitBreaker
from proxy.policies.budget import RetryBudget
from proxy.policies.bulkhead import Bulkhead
from proxy.policies.circuit_breaker import CircuitBreakerPolicy
from proxy.policies.deadline import Deadline
from proxy.policies.fallback import Fallback
from proxy.policies.global_rate_limit import GlobalRateLimit
from proxy.policies.idempotency import Idempotency
from proxy.policies.rate_limit import RateLimit
from proxy.policies.retry import Retry
from proxy.policies.timeout import AttemptTimeout
from proxy.routing import Route, Router
from proxy.store.records import LocalRecords
from proxy.telemetry.attempts import AttemptTelemetry
from proxy.telemetry.metrics import BreakerMetrics, Metrics, UpstreamMetrics
from proxy.telemetry.shared_state import IdempotencyMetrics, LimitMetrics
from proxy.telemetry.tracing import Tracing
from proxy.upstream import UpstreamCall, UpstreamPool

if TYPE_CHECKING:  # redis-py is imported only when the config has a `redis:` block
    from proxy.store.redis import RedisStore

__all__ = ["Runtime", "build_runtime"]


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
    redis: RedisStore | None = None  # the shared store (top-level `redis:`), kept across reloads while unchanged
    retired_redis: RedisStore | None = None  # the previous one, when a reload changed `redis:`; to close()

    def status(self, clock: Clock) -> dict[str, Any]:
        upstreams = {}
        for name, up in self.upstreams.items():
            upstreams[name] = {
                "url": up.pool.config.url,
                "active": up.bulkhead.active,
                "pending": up.bulkhead.pending,
                "circuit_breaker": _breaker_status(up.breaker, clock) if up.breaker is not None else None,
            }
        routes = {}
        for route in self.routes:
            bulkhead = self.upstreams[route.upstream].bulkhead  # per upstream, shared by its routes
            entry: dict[str, Any] = {"listener": route.listener, "upstream": route.upstream,
                                     "inflight": route.metrics.inflight._value.get(),
                                     "active": bulkhead.active, "pending": bulkhead.pending}
            if "rate_limit" in route.status:
                entry["rate_limit"] = route.status["rate_limit"].snapshot()
            if "retry" in route.status:
                entry["retry_budget_remaining"] = round(route.status["retry"].budget.remaining(), 3)
            if "circuit_breaker" in route.status and route.config.circuit_breaker.scope == "route":
                entry["circuit_breaker"] = _breaker_status(route.status["circuit_breaker"], clock)
            routes[f"{route.listener}/{route.name}"] = entry
        data = {"version": self.version, "upstreams": upstreams, "routes": routes}
        if self.redis is not None:
            data["redis"] = self.redis.snapshot()
        return data


def _redis_records(store: RedisStore | None) -> Any:
    from proxy.store.redis_records import RedisRecords
    return RedisRecords(_need(store))


def _need(store: RedisStore | None) -> RedisStore:
    if store is None:  # the loader refuses scope: global and store: redis without redis.url
        raise ValueError("this route needs the top-level redis block")
    return store


def _breaker_status(breaker: CircuitBreaker, clock: Clock) -> dict[str, Any]:
    """The breaker's snapshot with its state-entry time as wall-clock ISO 8601."""
    snapshot = dict(breaker.snapshot())
    entered_wall = time.time() - (clock.now() - breaker.entered_at)
    snapshot["entered_at"] = datetime.fromtimestamp(entered_wall, UTC).isoformat(timespec="milliseconds")
    snapshot["seconds_in_state"] = round(clock.now() - breaker.entered_at, 3)
    snapshot.pop("open_until", None)
    return snapshot


def _breaker(config: Any, clock: Clock, rng: random.Random, metrics: BreakerMetrics,
             runtime: Runtime) -> CircuitBreaker:
    def on_transition(old: BreakerState, new: BreakerState) -> None:
        metrics.transition(old.value, new.value)
    breaker = CircuitBreaker(config, clock, rng, on_transition)
    runtime.new_breakers.append((breaker, metrics))
    return breaker


class _Carry:
    """Stateful pieces of the previous runtime, reused when their config is unchanged."""

    def __init__(self, previous: Runtime | None) -> None:
        self.upstreams = previous.upstreams if previous else {}
        self.routes = {(r.listener, r.name): r for r in previous.routes} if previous else {}

    def route_part(self, key: tuple[str, str], part: str, config: RouteConfig, block: str) -> Any:
        old = self.routes.get(key)
        if old is not None and getattr(old.config, block) == getattr(config, block) \
                and old.config.upstream == config.upstream:
            return old.status.get(part)
        return None


def build_runtime(config: Config, *, metrics: Metrics, tracing: Tracing | None, clock: Clock,
                  rng: random.Random, previous: Runtime | None = None) -> Runtime:
    carry = _Carry(previous)
    runtime = Runtime(config=config, version=config_hash(config), upstreams={}, routers={})
    old_redis = previous.redis if previous is not None else None
    if config.redis is not None:
        from proxy.store.redis import RedisStore  # only now: a config without Redis never loads redis-py
        same = old_redis is not None and old_redis.config == config.redis
        runtime.redis = old_redis if same else RedisStore(config.redis, clock, rng)
    if old_redis is not None and old_redis is not runtime.redis:
        runtime.retired_redis = old_redis
    for name, upstream in config.upstreams.items():
        old = carry.upstreams.get(name)
        if old is not None and old.pool.config == upstream:
            runtime.upstreams[name] = old  # same pool, breaker and bulkhead: state carries over
        else:
            runtime.upstreams[name] = _build_upstream(name, upstream, old, runtime, metrics=metrics, clock=clock,
                                                      rng=rng)
            runtime.new_pools.append(runtime.upstreams[name].pool)
    for old_name, old in carry.upstreams.items():
        if runtime.upstreams.get(old_name) is not old:
            runtime.retired_pools.append(old.pool)
    for listener in config.listeners:
        routes = [_build_route(listener, route, runtime, carry, metrics=metrics, tracing=tracing, clock=clock,
                               rng=rng) for route in listener.routes]
        runtime.routes.extend(routes)
        runtime.routers[listener.name] = Router(routes)
    return runtime


def _build_upstream(name: str, config: UpstreamConfig, old: UpstreamRuntime | None, runtime: Runtime, *,
                    metrics: Metrics, clock: Clock, rng: random.Random) -> UpstreamRuntime:
    """A new pool; breaker and bulkhead are kept from ``old`` when their blocks did not change."""
    breaker_config, concurrency = config.circuit_breaker, config.concurrency
    assert breaker_config is not None and concurrency is not None  # resolved by the loader
    up_metrics = old.metrics if old is not None else metrics.for_upstream(name)
    breaker = old.breaker if old is not None and old.pool.config.circuit_breaker == breaker_config else (
        _breaker(breaker_config, clock, rng, metrics.for_breaker(name), runtime) if breaker_config.enabled else None)
    bulkhead = old.bulkhead if old is not None and old.pool.config.concurrency == concurrency else (
        Bulkhead(concurrency, name, up_metrics))
    return UpstreamRuntime(UpstreamPool(name, config), breaker, bulkhead, up_metrics)


def _build_route(listener: ListenerConfig, config: RouteConfig, runtime: Runtime, carry: _Carry, *,
                 metrics: Metrics, tracing: Tracing | None, clock: Clock, rng: random.Random) -> Route:
    upstream = runtime.upstreams[config.upstream]
    route_metrics = metrics.for_route(config.name, config.upstream)
    key = (listener.name, config.name)
    status: dict[str, Any] = {}
    policies: list[Policy] = []

    # Fallback: outermost, so it can stand in for an error raised anywhere below it.
    if config.fallback is not None:
        policies.append(Fallback(config.fallback))

    # Idempotency: inside the fallback (whose answers are not stored) and outside the rate limit,
    # so a replayed response costs no token and never reaches the upstream.
    if config.idempotency is not None:
        old_idem = carry.route_part(key, "idempotency", config, "idempotency")
        if old_idem is not None and config.idempotency.store == "redis" \
                and getattr(old_idem.store, "store", None) is not runtime.redis:
            old_idem = None  # its Redis store was replaced by this reload
        if old_idem is None:
            records = LocalRecords(clock) if config.idempotency.store == "local" else _redis_records(runtime.redis)
            old_idem = Idempotency(config.idempotency, config.name, records, clock,
                                   IdempotencyMetrics(metrics, config.name), lock_ttl_s=config.timeout.total + 1.0)
        policies.append(old_idem)
        status["idempotency"] = old_idem

    # Rate limit: before anything else spends work, so rejected requests cost
    # no deadline, budget, breaker probe or connection.
    if config.rate_limit is not None:
        limiter = carry.route_part(key, "rate_limit", config, "rate_limit")
        if limiter is not None and getattr(limiter, "store", runtime.redis) is not runtime.redis:
            limiter = None  # a global limit on a store this reload replaced
        if limiter is None and config.rate_limit.scope == "global":
            # Shared by every sidecar with the same limit name: tokens leased from Redis.
            limiter = GlobalRateLimit(config.rate_limit, config.name, _need(runtime.redis), clock, route_metrics,
                                      LimitMetrics(metrics, config.name))
        limiter = limiter or RateLimit(config.rate_limit, clock, route_metrics, metrics.rate_limit_shadowed.labels(
            route=config.name) if config.rate_limit.shadow else None)
        policies.append(limiter)
        status["rate_limit"] = limiter

    # Deadline (total timeout): outside retry, so one clock bounds all tries and backoff.
    policies.append(Deadline(config.timeout.total, clock, route_metrics))

    # The route's breaker: the upstream's, or its own with `scope: route`.
    breaker = upstream.breaker
    cb = config.circuit_breaker
    if cb.enabled and cb.scope == "route":
        old = carry.route_part(key, "circuit_breaker", config, "circuit_breaker")
        breaker = old if old is not None else _breaker(
            cb, clock, rng, metrics.for_breaker(f"{config.upstream}/{config.name}"), runtime)
    if not cb.enabled:
        breaker = None

    # Retry: outside the breaker and bulkhead, so each attempt is gated and counted separately;
    # it asks the breaker first, so a retry it would refuse does not replace the last answer.
    old_retry = carry.route_part(key, "retry", config, "retry")
    budget = old_retry.budget if old_retry is not None else RetryBudget.from_config(config.retry.budget, clock)
    retry = Retry(config.retry, budget=budget, backoff=backoff_from_config(config.retry.backoff, rng),
                  clock=clock, metrics=route_metrics, gate=breaker.would_admit if breaker is not None else None)
    status["retry"] = retry
    if config.retry.max_attempts > 1:
        policies.append(retry)

    # Circuit breaker: per attempt, so a retry is never sent to an open upstream;
    # outside the bulkhead, so fast-fails take no concurrency slot.
    if breaker is not None:
        breaker_policy = CircuitBreakerPolicy(breaker, cb.failure_status_codes, clock,
                                              f"upstream {config.upstream}")
        policies.append(breaker_policy)
        status["circuit_breaker"] = breaker_policy.breaker

    # Bulkhead: per upstream and per attempt; holds the slot until the body is streamed.
    policies.append(upstream.bulkhead)

    # Attempt telemetry: sees exactly the attempts that go out, and how each ended.
    policies.append(AttemptTelemetry(route=config.name, pool=upstream.pool, metrics=route_metrics,
                                     clock=clock, tracing=tracing))

    # Attempt timeout: innermost, so it times one try up to response headers.
    policies.append(AttemptTimeout(config.timeout.attempt, config.upstream, route_metrics))

    handler = build_chain(policies, UpstreamCall(upstream.pool, config.timeout, clock))
    # Bodies are buffered for replay only when the route can retry at all (or to fingerprint an idempotent one).
    buffer_limit = config.retry.buffer_limit if config.retry.max_attempts > 1 or config.idempotency else 0
    return Route(name=config.name, listener=listener.name, config=config, pool=upstream.pool, handler=handler,
                 metrics=route_metrics, buffer_limit=buffer_limit, status=status)
