"""Config checks of the adaptive blocks: each bad value is reported at its path."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import ConfigError
from tests.support.sidecar import base_config, to_config

ROUTE = "listeners[0].routes[0]"


def issues(config: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        to_config(config)
    return [str(issue) for issue in caught.value.issues]


def route(**blocks: Any) -> dict[str, Any]:
    return base_config("http://127.0.0.1:1", **blocks)


@pytest.mark.parametrize("percentile", [0, 100, -5, 120])
def test_adaptive_percentile_outside_0_100_is_refused(percentile: float) -> None:
    [issue] = issues(route(timeout={"adaptive": {"percentile": percentile}}))
    assert issue.startswith(f"{ROUTE}.timeout.adaptive.percentile: ")


def test_multiplier_below_one_is_refused() -> None:
    [issue] = issues(route(timeout={"adaptive": {"multiplier": 0.9}}))
    assert issue == f"{ROUTE}.timeout.adaptive.multiplier: Expected `float` >= 1.0"


def test_adaptive_min_above_attempt_is_refused() -> None:
    [issue] = issues(route(timeout={"attempt": "100ms", "adaptive": {"min": "200ms"}}))
    assert issue.startswith(f"{ROUTE}.timeout: adaptive.min (0.2s) is above attempt (0.1s)")


def test_adaptive_min_above_an_inherited_attempt_is_refused_in_defaults() -> None:
    config = route()
    config["defaults"]["timeout"]["adaptive"] = {"min": "3s"}  # attempt is 2s
    [issue] = issues(config)
    assert issue.startswith("defaults.timeout: adaptive.min (3s) is above attempt (2s)")


@pytest.mark.parametrize("load", [0, -0.1, 1.01])
def test_max_extra_load_outside_0_1_is_refused(load: float) -> None:
    [issue] = issues(route(hedge={"max_extra_load": load}))
    assert issue.startswith(f"{ROUTE}.hedge.max_extra_load: ")


def test_hedge_percentile_and_delay_are_checked() -> None:
    assert issues(route(hedge={"percentile": 100}))[0].startswith(f"{ROUTE}.hedge.percentile: ")
    assert issues(route(hedge={"delay": "soon"}))[0].startswith(f"{ROUTE}.hedge: invalid duration 'soon'")
    assert issues(route(hedge={"delay": 0}))[0] == f"{ROUTE}.hedge.delay: delay must be greater than 0"


def test_adaptive_concurrency_initial_above_max_active_is_refused() -> None:
    config = route()
    config["upstreams"]["svc"]["concurrency"] = {"max_active": 10, "adaptive": {"initial": 20}}
    [issue] = issues(config)
    assert issue.startswith("upstreams.svc.concurrency: adaptive.initial (20) is above max_active (10)")


def test_adaptive_concurrency_ratio_must_be_below_one() -> None:
    config = route()
    config["upstreams"]["svc"]["concurrency"] = {"adaptive": {"decrease_ratio": 1.0}}
    [issue] = issues(config)
    assert issue.startswith("upstreams.svc.concurrency.adaptive.decrease_ratio: ")


def test_a_valid_adaptive_config_loads_with_the_issue_defaults() -> None:
    config = route(timeout={"attempt": "2s", "adaptive": {}}, hedge={})
    config["upstreams"]["svc"]["concurrency"] = {"max_active": 100, "adaptive": {"algorithm": "aimd"}}
    loaded = to_config(config)
    timeout = loaded.listeners[0].routes[0].timeout
    assert timeout.adaptive is not None
    assert (float(timeout.adaptive.percentile), float(timeout.adaptive.multiplier), float(timeout.adaptive.min),
            float(timeout.adaptive.window), timeout.adaptive.min_samples) == (99.0, 2.0, 0.02, 30.0, 50)
    hedge = loaded.listeners[0].routes[0].hedge
    assert hedge is not None and (hedge.delay, hedge.percentile, hedge.max_extra_load, hedge.max_hedges) == (
        "auto", 95, 0.05, 1)
    adaptive = loaded.upstreams["svc"].concurrency.adaptive  # type: ignore[union-attr]
    assert adaptive is not None and (adaptive.initial, adaptive.min, adaptive.decrease_ratio) == (20, 4, 0.9)
