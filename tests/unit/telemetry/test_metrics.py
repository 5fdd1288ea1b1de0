"""Metric families and bound children: names, label values and exemplars."""

from __future__ import annotations

from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from proxy.telemetry.metrics import DROP_REASONS, Metrics, method_label, status_class


def test_status_class_and_method_labels_are_small_enums() -> None:
    assert [status_class(s) for s in (101, 204, 302, 429, 503, 700)] == [
        "1xx",
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "other",
    ]
    assert method_label("GET") == "GET" and method_label("PROPFIND") == "_OTHER"


def test_route_children_are_bound_once_and_reused() -> None:
    metrics = Metrics(process_collectors=False)
    route = metrics.for_route("r", "u")
    route.request_done("GET", 200, "upstream", 0.01)
    route.request_done("GET", 201, "upstream", 0.02)
    counters = {id(series[0]) for series in route.series.cached()}
    assert len(route.series.cached()) == 2 and len(counters) == 1  # one label set (2xx): one child, reused
    for n in range(2000):  # made-up methods all land on _OTHER and never grow the cache
        route.request_done(f"M{n}", 200, "upstream", 0.01)
    assert len(route.series.cached()) == 2
    value = metrics.registry.get_sample_value(
        "outrigger_requests_total",
        {"route": "r", "upstream": "u", "method": "GET", "code": "2xx", "outcome": "upstream"},
    )
    assert value == 2


def test_request_duration_carries_the_trace_id_exemplar_in_openmetrics() -> None:
    metrics = Metrics(process_collectors=False)
    metrics.for_route("r", "u").request_done("GET", 200, "upstream", 0.003, {"trace_id": "ab" * 16})
    text = openmetrics_latest(metrics.registry).decode()
    assert f'# {{trace_id="{"ab" * 16}"}} 0.003' in text


def test_families_with_fixed_label_values_are_exposed_before_any_event() -> None:
    metrics = Metrics(process_collectors=False, version="1.2.3")
    get = metrics.registry.get_sample_value
    assert get("outrigger_build_info", {"version": "1.2.3"}) == 1
    assert get("outrigger_config_reloads_total", {"result": "failure"}) == 0
    for reason in DROP_REASONS:
        assert get("outrigger_spans_dropped_total", {"reason": reason}) == 0
    assert get("outrigger_circuit_breaker_state", {"upstream": "u", "state": "closed"}) is None  # no breaker yet
    breaker = metrics.for_breaker("u")
    assert get("outrigger_circuit_breaker_state", {"upstream": "u", "state": "closed"}) is None  # built: no series
    breaker.show("closed")  # in service
    assert get("outrigger_circuit_breaker_state", {"upstream": "u", "state": "closed"}) == 1
    breaker.transition("closed", "open")
    assert get("outrigger_circuit_breaker_state", {"upstream": "u", "state": "open"}) == 1
    assert get("outrigger_circuit_breaker_state", {"upstream": "u", "state": "closed"}) == 0
