"""What a reload carries over from the previous runtime (``proxy.app._Carry``), one test per rule.

State (breaker, bulkhead, retry budget, rate limiter, pool) survives a reload
exactly when the config block it was made from is unchanged; anything else is
built fresh.  These pin today's rules.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from typing import Any

from proxy.app import Runtime, build_runtime
from proxy.clock import FakeClock
from proxy.telemetry.metrics import Metrics
from tests.support.sidecar import base_config, to_config

URL = "http://127.0.0.1:9"


def config_data() -> dict[str, Any]:
    data = base_config(URL, rate_limit={"requests_per_second": 10, "burst": 10},
                       circuit_breaker={"scope": "route", "consecutive_failures": 3})
    data["upstreams"]["other"] = {"url": "http://127.0.0.1:10"}
    return data


class Reloads:
    """Builds runtimes the way the sidecar does: each one from the last."""

    def __init__(self) -> None:
        self.metrics = Metrics(process_collectors=False)
        self.clock = FakeClock()
        self.current: Runtime | None = None

    def load(self, data: dict[str, Any]) -> Runtime:
        self.current = build_runtime(to_config(data), metrics=self.metrics, tracing=None, clock=self.clock,
                                     rng=random.Random(7), previous=self.current)
        return self.current


def test_an_unchanged_upstream_keeps_its_pool_breaker_and_bulkhead() -> None:
    reloads = Reloads()
    before = reloads.load(config_data()).upstreams["svc"]
    after = reloads.load(config_data())
    assert after.upstreams["svc"] is before
    assert after.new_pools == [] and after.retired_pools == []


def test_a_changed_upstream_gets_a_new_pool_and_keeps_breaker_and_bulkhead_whose_blocks_did_not_change() -> None:
    reloads = Reloads()
    before = reloads.load(config_data()).upstreams["svc"]
    data = config_data()
    data["upstreams"]["svc"]["max_connections"] = 7
    after = reloads.load(data)
    up = after.upstreams["svc"]
    assert up.pool is not before.pool and after.new_pools == [up.pool] and after.retired_pools == [before.pool]
    assert up.breaker is before.breaker and up.bulkhead is before.bulkhead and up.metrics is before.metrics


def test_a_changed_breaker_or_concurrency_block_builds_that_piece_fresh() -> None:
    reloads = Reloads()
    before = reloads.load(config_data()).upstreams["svc"]
    data = config_data()
    data["upstreams"]["svc"]["circuit_breaker"] = {"consecutive_failures": 9}
    up = reloads.load(data).upstreams["svc"]
    assert up.breaker is not before.breaker and up.bulkhead is before.bulkhead
    data["upstreams"]["svc"]["concurrency"] = {"max_active": 3}
    again = reloads.load(data).upstreams["svc"]
    assert again.bulkhead is not up.bulkhead and again.breaker is up.breaker


def test_a_removed_upstream_has_its_pool_retired() -> None:
    reloads = Reloads()
    before = reloads.load(config_data()).upstreams["other"]
    data = config_data()
    del data["upstreams"]["other"]
    after = reloads.load(data)
    assert "other" not in after.upstreams and after.retired_pools == [before.pool]


def _route_state(runtime: Runtime) -> dict[str, Any]:
    """The route's stateful parts that are set, by name."""
    state = runtime.routes[0].state
    parts = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return {name: part for name, part in parts.items() if part is not None}


def test_an_unchanged_route_keeps_its_rate_limiter_retry_budget_and_route_breaker() -> None:
    reloads = Reloads()
    before = dict(_route_state(reloads.load(config_data())))
    after = _route_state(reloads.load(config_data()))
    assert after["rate_limit"] is before["rate_limit"]
    assert after["retry"].budget is before["retry"].budget  # the Retry policy is new, its budget carried
    assert after["circuit_breaker"] is before["circuit_breaker"]


def test_each_route_piece_is_built_fresh_when_its_own_block_changes_and_only_then() -> None:
    reloads = Reloads()
    before = dict(_route_state(reloads.load(config_data())))
    data = config_data()
    data["listeners"][0]["routes"][0]["rate_limit"] = {"requests_per_second": 20, "burst": 10}
    after = _route_state(reloads.load(data))
    assert after["rate_limit"] is not before["rate_limit"]
    assert after["retry"].budget is before["retry"].budget
    assert after["circuit_breaker"] is before["circuit_breaker"]

    data["listeners"][0]["routes"][0]["retry"] = {"max_attempts": 2}
    again = _route_state(reloads.load(data))
    assert again["retry"].budget is not after["retry"].budget
    assert again["rate_limit"] is after["rate_limit"] and again["circuit_breaker"] is after["circuit_breaker"]


def test_a_route_moved_to_another_upstream_carries_nothing() -> None:
    reloads = Reloads()
    before = dict(_route_state(reloads.load(config_data())))
    data = config_data()
    data["listeners"][0]["routes"][0]["upstream"] = "other"
    after = _route_state(reloads.load(data))
    assert after["rate_limit"] is not before["rate_limit"]
    assert after["retry"].budget is not before["retry"].budget
    assert after["circuit_breaker"] is not before["circuit_breaker"]


def test_a_renamed_route_is_a_new_route_and_carries_nothing() -> None:
    reloads = Reloads()
    before = dict(_route_state(reloads.load(config_data())))
    data = copy.deepcopy(config_data())
    data["listeners"][0]["routes"][0]["name"] = "renamed"
    after = _route_state(reloads.load(data))
    assert after["rate_limit"] is not before["rate_limit"]
    assert after["retry"].budget is not before["retry"].budget
