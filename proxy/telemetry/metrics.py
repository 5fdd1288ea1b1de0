"""Prometheus metric families and the per-route handles bound at startup.

``Metrics`` owns one ``CollectorRegistry`` (never the global one) and creates
every public family.  ``RouteMetrics`` holds the children a route touches on
the hot path, bound once per route so requests never call ``.labels()`` with
fresh label tuples; label sets with a small open range (method x status
class x outcome) are cached on first use.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from proxy.telemetry import line_writer
from proxy.telemetry.labels import method_label, status_class
from proxy.telemetry.lean import LeanCounterFamily, LeanHistogramFamily, RequestSeries, Series
from proxy.telemetry.live import LiveStats

__all__ = [
    "ATTEMPT_RESULTS", "BREAKER_STATES", "DROP_REASONS", "ENDPOINT_STATES", "HEDGE_RESULTS", "TIMEOUT_KINDS",
    "BreakerMetrics", "EndpointMetrics", "Metrics", "RouteMetrics", "UpstreamMetrics",
    "method_label", "status_class",
]

ATTEMPT_RESULTS = ("success", "http_5xx", "http_4xx", "timeout", "reset", "connect_failure")
TIMEOUT_KINDS = ("connect", "attempt", "total", "idle")
BREAKER_STATES = ("closed", "open", "half_open")
DROP_REASONS = ("export_failed", "queue_full", "collector_down", "shutdown")
ENDPOINT_STATES = ("healthy", "ejected", "slow_start")
HEDGE_RESULTS = ("won", "lost", "suppressed")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

class _LogDropsCollector(Collector):
    """``outrigger_log_lines_dropped_total{stream}``: read at scrape time from the process's log writers."""

    def describe(self) -> list[CounterMetricFamily]:
        return [self._family()]

    def collect(self) -> list[CounterMetricFamily]:
        family = self._family()
        for stream in ("access", "log"):
            family.add_metric([stream], line_writer.dropped_lines.get(stream, 0))
        return [family]

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily("outrigger_log_lines_dropped",
                                   "Log lines dropped because the stream's reader stalled (stream: access, log).",
                                   labels=["stream"])


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
        # The four families every request updates are lean ones (see proxy.telemetry.lean).
        self.requests = LeanCounterFamily("outrigger_requests", "Requests the app sent through the sidecar.",
                                          ["route", "upstream", "method", "code", "outcome"], r)
        self.request_duration = LeanHistogramFamily(
            "outrigger_request_duration_seconds", "Time from request received to response headers sent.",
            ["route", "upstream", "method", "code"], r, buckets=_LATENCY_BUCKETS)
        self.attempts = LeanCounterFamily("outrigger_upstream_attempts", "Upstream attempts by result.",
                                          ["route", "upstream", "result"], r)
        self.attempt_duration = LeanHistogramFamily(
            "outrigger_upstream_attempt_duration_seconds", "Time from attempt start to upstream headers.",
            ["route", "upstream"], r, buckets=_LATENCY_BUCKETS)
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
        self.upstream_endpoints = Gauge("outrigger_upstream_endpoints", "Endpoints of an upstream by state.",
                                        ["upstream", "state"], registry=r)
        self.outlier_ejections = Counter("outrigger_outlier_ejections", "Endpoints ejected by outlier detection.",
                                         ["upstream", "reason"], registry=r)
        self.endpoint_attempts = Counter("outrigger_endpoint_attempts", "Upstream attempts by endpoint and result.",
                                         ["upstream", "endpoint", "result"], registry=r)
        self.endpoint_sources: dict[str, list[Callable[[str], int]]] = {}  # see EndpointMetrics
        r.register(_LogDropsCollector())
        self.tunnels_active = Gauge("outrigger_tunnels_active", "Upgrade tunnels (WebSocket and others) open now.",
                                    registry=r)
        self.tunnels = Counter("outrigger_tunnels", "Upgrade tunnels opened, by route.", ["route"], registry=r)
        # Adaptive policies (docs/adaptive.md): series appear only for routes/upstreams that use them.
        self.adaptive_timeout = Gauge("outrigger_adaptive_timeout_seconds", "The attempt timeout in force.",
                                      ["route", "upstream"], registry=r)
        self.hedges = Counter("outrigger_hedges", "Hedged attempts: won, lost, or suppressed by their limits.",
                              ["route", "upstream", "result"], registry=r)
        self.concurrency_limit = Gauge("outrigger_concurrency_limit", "The adaptive concurrency limit in force.",
                                       ["upstream"], registry=r)
        # Dead-letter spool (docs/dead-letter.md); the gauges describe the one spool of the process.
        self.dead_letters = Counter("outrigger_dead_letters", "Finally failed requests by spool result.",
                                    ["route", "result"], registry=r)
        self.dead_letter_replays = Counter("outrigger_dead_letter_replays", "Replays seen, by result.",
                                           ["route", "result"], registry=r)
        self.dead_letter_spool_bytes = Gauge("outrigger_dead_letter_spool_bytes", "Bytes in the spool.", registry=r)
        self.dead_letter_entries = Gauge("outrigger_dead_letter_entries", "Entries waiting for a replay.",
                                         registry=r)
        self.dead_letter_oldest = Gauge("outrigger_dead_letter_oldest_entry_timestamp_seconds",
                                        "Unix time of the oldest waiting entry (0: none).", registry=r)
        self.dead_letter_write_errors = Counter("outrigger_dead_letter_write_errors",
                                                "Entries lost to a failed spool write.", registry=r)
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
        self._live: dict[tuple[str, str], LiveStats] = {}
        for result in ("success", "failure"):
            self.config_reloads.labels(result=result)
        for reason in DROP_REASONS:
            self.spans_dropped.labels(reason=reason)

    def for_route(self, route: str, upstream: str) -> RouteMetrics:
        route_metrics = RouteMetrics(self, route, upstream)
        # The same route across reloads keeps its live figures, as its Prometheus series do.
        route_metrics.inflight = route_metrics.live = self._live.setdefault((route, upstream), route_metrics.live)
        # The gauge is read from the live integers at scrape time (a route that changed upstream
        # on a reload has two), so the hot path touches no Prometheus lock for it.
        self.inflight.labels(route=route).set_function(functools.partial(self._inflight, route))
        return route_metrics

    def _inflight(self, route: str) -> float:
        return float(sum(live.inflight for (name, _), live in self._live.items() if name == route))

    def for_upstream(self, upstream: str) -> UpstreamMetrics:
        return UpstreamMetrics(self, upstream)

    def for_endpoints(self, upstream: str) -> EndpointMetrics:
        return EndpointMetrics(self, upstream)

    def for_breaker(self, breaker_label: str) -> BreakerMetrics:
        """State series of one breaker (``<upstream>``, or ``<upstream>/<route>`` for a route's own)."""
        return BreakerMetrics(self, breaker_label)


class UpstreamMetrics:
    """Children for per-upstream state: the bulkhead."""

    def __init__(self, metrics: Metrics, upstream: str) -> None:
        self.upstream = upstream
        self.bulkhead_rejected = metrics.bulkhead_rejected.labels(upstream=upstream)
        self._metrics = metrics

    def concurrency_limit(self) -> Any:
        """The adaptive limit's gauge child (bound only for an upstream with ``concurrency.adaptive``)."""
        return self._metrics.concurrency_limit.labels(upstream=self.upstream)


class EndpointMetrics:
    """An upstream's endpoint series; the endpoint label is bounded by the endpoint count.

    Series of an endpoint that left the set are removed, so discovery churn
    does not grow the series count.  During a reload two generations of an
    upstream's endpoint set can be alive; the state gauge follows the newest
    one in service, and the series go only when the last one closes.
    """

    def __init__(self, metrics: Metrics, upstream: str) -> None:
        self._metrics = metrics
        self.upstream = upstream
        self._attempts: dict[tuple[str, str], Any] = {}
        self._count: Callable[[str], int] | None = None

    def watch(self, count: Callable[[str], int]) -> None:
        """Endpoint counts by state, computed when scraped (no timer follows ejections ending)."""
        self._count = count
        sources = self._metrics.endpoint_sources.setdefault(self.upstream, [])
        sources.append(count)
        for state in ENDPOINT_STATES:
            self._metrics.upstream_endpoints.labels(upstream=self.upstream, state=state).set_function(
                functools.partial(_newest_count, sources, state))

    def attempt(self, endpoint: str, result: str) -> None:
        key = (endpoint, result)
        child = self._attempts.get(key)
        if child is None:
            child = self._attempts[key] = self._metrics.endpoint_attempts.labels(
                upstream=self.upstream, endpoint=endpoint, result=result)
        child.inc()

    def ejected(self, reason: str) -> None:
        self._metrics.outlier_ejections.labels(upstream=self.upstream, reason=reason).inc()

    def forget(self, endpoint: str) -> None:
        for key in [key for key in self._attempts if key[0] == endpoint]:
            del self._attempts[key]
            with contextlib.suppress(KeyError):
                self._metrics.endpoint_attempts.remove(self.upstream, endpoint, key[1])

    def close(self) -> None:
        sources = self._metrics.endpoint_sources.get(self.upstream, [])
        if self._count in sources:
            sources.remove(self._count)
        if sources:
            return  # a newer generation of this upstream serves on: its series stay
        self._metrics.endpoint_sources.pop(self.upstream, None)
        for endpoint in {key[0] for key in self._attempts}:
            self.forget(endpoint)
        for state in ENDPOINT_STATES:
            with contextlib.suppress(KeyError):
                self._metrics.upstream_endpoints.remove(self.upstream, state)


def _newest_count(sources: list[Callable[[str], int]], state: str) -> int:
    return sources[-1](state) if sources else 0


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
        # In flight: the Gauge child and a plain integer together (inc()/dec()), for /status.
        self.inflight = self.live = LiveStats()
        self._retries: dict[str, Any] = {}
        self.series = RequestSeries(self.live, self._bind)
        # request_done(method, status, outcome, seconds, exemplar=None): a compiled method (lean.py).
        self.request_done = self.series.done

    def adaptive_timeout(self) -> Any:
        """The adaptive timeout's gauge child (bound only for a route with ``timeout.adaptive``)."""
        return self._metrics.adaptive_timeout.labels(route=self.route, upstream=self.upstream)

    def hedge_results(self) -> dict[str, Any]:
        """Hedge counters by result (bound only for a route with ``hedge``)."""
        return {result: self._metrics.hedges.labels(route=self.route, upstream=self.upstream, result=result)
                for result in HEDGE_RESULTS}

    def retry(self, reason: str) -> None:
        child = self._retries.get(reason)
        if child is None:
            child = self._retries[reason] = self._metrics.retries.labels(
                route=self.route, upstream=self.upstream, reason=reason)
        child.inc()

    def _bind(self, method: str, status: int, outcome: str) -> tuple[Series, bool]:
        """The request counter and duration histogram of one (method, status, outcome), and
        whether ``RequestSeries`` may cache them (not for made-up methods: bounded)."""
        label, code = method_label(method), status_class(status)
        series = (self._metrics.requests.labels(route=self.route, upstream=self.upstream, method=label, code=code,
                                                outcome=outcome),
                  self._metrics.request_duration.labels(route=self.route, upstream=self.upstream, method=label,
                                                        code=code))
        return series, label == method
