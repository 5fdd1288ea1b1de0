"""Assembly of the adaptive policies in proxy.app: what a reload keeps, and what /status shows."""

from __future__ import annotations

import random
from typing import Any

import pytest

from proxy.app import Runtime, build_runtime
from proxy.clock import FakeClock
from proxy.telemetry.metrics import Metrics
from tests.support.sidecar import base_config, to_config


def runtime(data: dict[str, Any], clock: FakeClock, previous: Runtime | None = None) -> Runtime:
    return build_runtime(to_config(data), metrics=Metrics(process_collectors=False), tracing=None, clock=clock,
                         rng=random.Random(1), previous=previous)


def adaptive_route(**timeout: Any) -> dict[str, Any]:
    return base_config("http://upstream:8080", timeout={"attempt": "2s", "adaptive": {"min_samples": 2}, **timeout},
                       hedge={"delay": "auto"})


def test_a_reload_keeps_the_learned_latencies_when_upstream_and_window_are_unchanged() -> None:
    clock = FakeClock()
    first = runtime(adaptive_route(), clock)
    sketch = first.routes[0].state.latency
    assert sketch is not None
    sketch.add(0.05)
    sketch.add(0.05)
    second = runtime(adaptive_route(total="4s"), clock, previous=first)
    assert second.routes[0].state.latency is sketch
    learned = second.status(clock)["routes"]["default"]["adaptive_timeout"]
    assert learned["learned"] is True and learned["timeout_s"] == pytest.approx(0.1, rel=0.02)
    changed = adaptive_route()
    changed["listeners"][0]["routes"][0]["timeout"]["adaptive"]["window"] = "10s"
    third = runtime(changed, clock, previous=second)
    assert third.routes[0].state.latency is not sketch  # a new window starts empty


def test_routes_without_adaptive_blocks_have_no_sketch_and_show_nothing_new() -> None:
    clock = FakeClock()
    built = runtime(base_config("http://upstream:8080", hedge={"delay": "30ms"}), clock)
    assert built.routes[0].state.latency is None
    entry = built.status(clock)["routes"]["default"]
    assert "adaptive_timeout" not in entry
    assert entry["hedge"]["auto"] is False and entry["hedge"]["delay_s"] == 0.03
    assert "concurrency_limit" not in built.status(clock)["upstreams"]["svc"]
