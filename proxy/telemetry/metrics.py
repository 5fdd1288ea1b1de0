"""Prometheus metric families and the per-route handles bound at startup.

``Metrics`` owns one ``CollectorRegistry`` (never the global one) and creates
every public family.  ``RouteMetrics`` holds the children a route touches on
the hot path, bound once per route so requests never call ``.labels()`` with
fresh label tuples; label sets with a small open range (method x status
class x outcome) are cached on first use.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.metrics import MetricWrapperBase

__all__ = [
    "ATTEMPT_RESULTS", "BREAKER_STATES", "DROP_REASONS", "TIMEOUT_KINDS", "BreakerMetrics", "Metrics", "RouteMetrics",
    "UpstreamMetrics",
    "method_label", "status_class",
]

ATTEMPT_RESULTS = ("success", "http_5xx", "http_4xx", "timeout", "reset", "connect_failure")
TIMEOUT_KINDS = ("connect", "attempt", "total", "idle")
BREAKER_STATES = ("closed", "open", "half_open")
DROP_REASONS = ("export_failed", "queue_full", "collector_down", "shutdown")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def status_class(status: int) -> str:
    return _CLASSES.get(status // 100, "other")


def method_label(method: str) -> str:
    """The method as a label value; any non-standard token is ``_OTHER`` (semconv), so apps
    sending made-up methods cannot grow the series count."""
    return method if method in _METHODS else "_OTHER"


class Metrics:
    """Every public metric family, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, version: str = "0",
                 process_collectors: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process_collectors:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)
        self.requests = Counter("outrigger_requests", "Requests the app sent through the sidecar.",
                                ["route", "upstream", "method", "code", "outcome"], registry=r)
        self.request_duration = Histogram(
            "outrigger_request_duration_seconds", "Time from request received to response headers sent.",
            ["route", "upstream", "method", "code"], buckets=_LATENCY_BUCKETS, registry=r)
        self.attempts = Counter("outrigger_upstream_attempts", "Upstream attempts by result.",
                                ["route", "upstream", "result"], registry=r)
        self.attempt_duration = Histogram(
            "outrigger_upstream_attempt_duration_seconds", "Time from attempt start to upstream headers.",
            ["route", "upstream"], buckets=_LATENCY_BUCKETS, registry=r)
        self.retries = Counter("outrigger_retries", "Retries sent, by the reason for retrying.",
                               ["route", "upstream", "reason"], registry=r)
        self.budget_exhausted = Counter("outrigger_retry_budget_exhausted",
                                        "Retries not sent because the retry budget was spent.",
                                        ["route", "upstream"], registry=r)
        self.breaker_state = Gauge("outrigger_circuit_breaker_state",
                                   "1 for the breaker's current state, 0 for the others.",
                                   ["upstream", "state"], registry=r)
        self.breaker_transitions = Counter("outrigger_circuit_breaker_transitions",
                                           "Circuit breaker state changes.",
                                           ["upstream", "from_state", "to_state"], registry=r)
        self.rate_limited = Counter("outrigger_rate_limited", "Requests rejected by the rate limiter.",
                                    ["route"], registry=r)
        self.timeouts = Counter("outrigger_timeouts", "Timeouts by kind.", ["route", "upstream", "kind"],
                                registry=r)
        self.inflight = Gauge("outrigger_inflight_requests", "Requests in flight through the sidecar.",
                              ["route"], registry=r)
        self.bulkhead_rejected = Counter("outrigger_bulkhead_rejected", "Requests shed by the bulkhead.",
                                         ["upstream"], registry=r)
        self.config_reloads = Counter("outrigger_config_reloads", "Config reloads by result.", ["result"],
                                      registry=r)
        self.spans_dropped = Counter("outrigger_spans_dropped", "Spans not delivered to the trace collector.",
                                     ["reason"], registry=r)
        # Shared state across replicas (proxy/store, docs/shared-state.md); children bound in
        # proxy.telemetry.shared_state.
        self.rate_limit_store_errors = Counter("outrigger_rate_limit_store_errors",
                                               "Failed Redis calls of global rate limits.", ["route"], registry=r)
        self.rate_limit_mode = Gauge("outrigger_rate_limit_mode", "1 for the current mode of a global rate limit.",
                                     ["route", "mode"], registry=r)
        self.rate_limit_lease_requests = Counter("outrigger_rate_limit_lease_requests",
                                                 "Token lease requests to the shared limit, by result.",
                                                 ["route", "result"], registry=r)
        self.rate_limit_shadowed = Counter("outrigger_rate_limit_shadowed",
                                           "Requests a shadow rate limit would have refused (let through).",
                                           ["route"], registry=r)
        self.idempotency = Counter("outrigger_idempotency", "Requests with an Idempotency-Key, by result.",
                                   ["route", "result"], registry=r)
        self.build_info = Gauge("outrigger_build_info", "Build information.", ["version"], registry=r)
        self.build_info.labels(version=version).set(1)
        for result in ("success", "failure"):
            self.config_reloads.labels(result=result)
        for reason in DROP_REASONS:
            self.spans_dropped.labels(reason=reason)

    def for_route(self, route: str, upstream: str) -> RouteMetrics:
        return RouteMetrics(self, route, upstream)

    def for_upstream(self, upstream: str) -> UpstreamMetrics:
        return UpstreamMetrics(self, upstream)

    def for_breaker(self, breaker_label: str) -> BreakerMetrics:
        """State series of one breaker (``<upstream>``, or ``<upstream>/<route>`` for a route's own)."""
        return BreakerMetrics(self, breaker_label)


class UpstreamMetrics:
    """Children for per-upstream state: the bulkhead."""

    def __init__(self, metrics: Metrics, upstream: str) -> None:
        self.upstream = upstream
        self.bulkhead_rejected = metrics.bulkhead_rejected.labels(upstream=upstream)


class BreakerMetrics:
    """A breaker's state gauge (1 for its current state) and transitions; made only where a breaker runs.

    Building one changes no series: a config that is then rejected must not
    disturb the running breaker's.  ``show`` puts the new breaker's state up
    once it is in service.
    """

    def __init__(self, metrics: Metrics, breaker_label: str) -> None:
        self._metrics = metrics
        self.upstream = breaker_label  # the `upstream` label: "<upstream>" or "<upstream>/<route>"

    def show(self, current: str) -> None:
        gauge = self._metrics.breaker_state
        for state in BREAKER_STATES:
            gauge.labels(upstream=self.upstream, state=state).set(1 if state == current else 0)

    def transition(self, from_state: str, to_state: str) -> None:
        self._metrics.breaker_transitions.labels(
            upstream=self.upstream, from_state=from_state, to_state=to_state).inc()
        self.show(to_state)


class RouteMetrics:
    """Children for one route, bound once when the route's chain is built."""

    def __init__(self, metrics: Metrics, route: str, upstream: str) -> None:
        self._metrics = metrics
        self.route = route
        self.upstream = upstream
        labels = {"route": route, "upstream": upstream}
        self.attempt_results = {res: metrics.attempts.labels(result=res, **labels) for res in ATTEMPT_RESULTS}
        self.attempt_duration = metrics.attempt_duration.labels(**labels)
        self.timeouts = {kind: metrics.timeouts.labels(kind=kind, **labels) for kind in TIMEOUT_KINDS}
        self.budget_exhausted = metrics.budget_exhausted.labels(**labels)
        self.rate_limited = metrics.rate_limited.labels(route=route)
        self.inflight = metrics.inflight.labels(route=route)
        self._retries: dict[str, Any] = {}
        self._requests: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    def retry(self, reason: str) -> None:
        child = self._retries.get(reason)
        if child is None:
            child = self._retries[reason] = self._metrics.retries.labels(
                route=self.route, upstream=self.upstream, reason=reason)
        child.inc()

    def request_done(self, method: str, status: int, outcome: str, seconds: float,
                     exemplar: dict[str, str] | None = None) -> None:
        code = status_class(status)
        method = method_label(method)
        key = (method, code, outcome)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self._metrics.requests.labels(
                route=self.route, upstream=self.upstream, method=method, code=code, outcome=outcome)
        counter.inc()
        hkey = (method, code)
        histogram: MetricWrapperBase | None = self._durations.get(hkey)
        if histogram is None:
            histogram = self._durations[hkey] = self._metrics.request_duration.labels(
                route=self.route, upstream=self.upstream, method=method, code=code)
        histogram.observe(seconds, exemplar)  # type: ignore[attr-defined]
