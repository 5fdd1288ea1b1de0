"""Metric children of the shared-state policies, bound once per route (families live in ``metrics.Metrics``)."""

from __future__ import annotations

from typing import Any

from proxy.telemetry.metrics import Metrics

__all__ = ["IDEMPOTENCY_RESULTS", "LEASE_RESULTS", "LIMIT_MODES", "IdempotencyMetrics", "LimitMetrics"]

LIMIT_MODES = ("global", "local_fallback", "open", "closed")
LEASE_RESULTS = ("granted", "partial", "denied", "error")
IDEMPOTENCY_RESULTS = ("stored", "replayed", "conflict", "in_progress", "bypassed", "store_error")


class LimitMetrics:
    """A global rate limit's series: store errors, mode (1 for the current one), lease requests, shadow."""

    def __init__(self, metrics: Metrics, route: str) -> None:
        self.store_errors = metrics.rate_limit_store_errors.labels(route=route)
        self.modes = {mode: metrics.rate_limit_mode.labels(route=route, mode=mode) for mode in LIMIT_MODES}
        self.leases: dict[str, Any] = {
            res: metrics.rate_limit_lease_requests.labels(route=route, result=res) for res in LEASE_RESULTS}
        self.shadowed = metrics.rate_limit_shadowed.labels(route=route)

    def show_mode(self, current: str) -> None:
        for mode, gauge in self.modes.items():
            gauge.set(1 if mode == current else 0)


class IdempotencyMetrics:
    def __init__(self, metrics: Metrics, route: str) -> None:
        self.results: dict[str, Any] = {
            res: metrics.idempotency.labels(route=route, result=res) for res in IDEMPOTENCY_RESULTS}

    def count(self, result: str) -> None:
        self.results[result].inc()
