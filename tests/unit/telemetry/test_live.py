"""Live per-route figures (``proxy.telemetry.live``) and the inflight gauge read from them."""

from __future__ import annotations

from proxy.telemetry.live import LiveStats
from proxy.telemetry.metrics import Metrics


def test_the_inflight_gauge_is_read_from_the_live_figures_of_every_upstream_the_route_had() -> None:
    metrics = Metrics(process_collectors=False)
    before, after = metrics.for_route("orders", "old"), metrics.for_route("orders", "new")  # a reload moved it
    before.inflight.inc()
    after.inflight.inc()
    after.inflight.inc()
    assert metrics.registry.get_sample_value("outrigger_inflight_requests", {"route": "orders"}) == 3
    before.inflight.dec()
    assert metrics.registry.get_sample_value("outrigger_inflight_requests", {"route": "orders"}) == 2


def test_done_counts_requests_5xx_and_keeps_a_window_for_p99() -> None:
    live = LiveStats()
    for ms in range(1, 101):
        live.done(200 if ms % 10 else 503, ms / 1000)
    snapshot = live.snapshot()
    assert (snapshot["requests"], snapshot["errors"], snapshot["latency_window"]) == (100, 10, 100)
    assert snapshot["p99_s"] == 0.099
