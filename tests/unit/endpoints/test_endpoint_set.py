"""The endpoint set's membership rules: diffing, draining removed endpoints, exclusion, ejection caps."""

from __future__ import annotations

import asyncio
import random
from typing import Any, cast

import pytest

from proxy import errors
from proxy.clock import FakeClock
from proxy.config.types import OutlierDetectionConfig, UpstreamConfig
from proxy.config.units import Duration
from proxy.telemetry.metrics import Metrics
from proxy.upstream.endpoints.endpoint_set import Endpoint, EndpointSet
from proxy.upstream.pool import H1Pool


class FakePool:
    """Stands in for an endpoint's connection pool: the set only opens, counts and closes pools."""

    def __init__(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.closed = False
        self.idle_count = 0

    async def close(self) -> None:
        self.closed = True

    async def preconnect(self, wanted: int, timeout_s: float | None) -> None:
        self.idle_count = wanted


def make_set(clock: FakeClock, **config: Any) -> tuple[EndpointSet, list[FakePool], Metrics]:
    pools: list[FakePool] = []

    def factory(host: str, port: int) -> H1Pool:
        pool = FakePool(host, port)
        pools.append(pool)
        return cast(H1Pool, pool)

    metrics = Metrics(process_collectors=False)
    upstream = UpstreamConfig(url="http://svc:80", endpoints=("127.0.0.1:1",), **config)
    return (EndpointSet("svc", upstream, clock=clock, rng=random.Random(1), metrics=metrics.for_endpoints("svc"),
                        pool_factory=factory), pools, metrics)


A, B, C = ("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)


async def test_an_update_keeps_what_stays_adds_what_is_new_and_drains_what_left() -> None:
    clock = FakeClock()
    endpoints, pools, _ = make_set(clock)
    await endpoints.start([A, B])
    kept = {e.address: e for e in endpoints.endpoints}
    busy = endpoints.pick(None)  # one request in flight
    endpoints.update([("10.0.0.1", 80), C] if busy.address == "10.0.0.2:80" else [("10.0.0.2", 80), C])
    await asyncio.sleep(0)
    addresses = sorted(e.address for e in endpoints.endpoints)
    assert busy.address not in addresses and len(addresses) == 2
    assert busy.removed and not cast(FakePool, busy.pool).closed  # its request is still running
    survivor = next(e for e in endpoints.endpoints if e.address in kept)
    assert survivor is kept[survivor.address]  # same object: connections and stats carried
    endpoints.finish(busy)
    await asyncio.sleep(0)
    assert cast(FakePool, busy.pool).closed
    assert len(pools) == 3
    await endpoints.close()


async def test_an_idle_removed_endpoint_closes_at_once_and_an_empty_update_is_ignored() -> None:
    clock = FakeClock()
    endpoints, pools, _ = make_set(clock)
    await endpoints.start([A, B])
    endpoints.update([A])
    await asyncio.sleep(0)
    assert [p.closed for p in pools] == [False, True]
    endpoints.update([])  # a DNS answer with nothing in it keeps the last set
    assert [e.address for e in endpoints.endpoints] == ["10.0.0.1:80"]
    await endpoints.close()


async def test_endpoints_present_at_start_skip_slow_start_but_later_ones_ramp() -> None:
    clock = FakeClock()
    endpoints, _, _ = make_set(clock, slow_start=Duration(30))
    await endpoints.start([A])
    endpoints.update([A, B])
    states = {e.address: e.state(clock.now()) for e in endpoints.endpoints}
    assert states == {"10.0.0.1:80": "healthy", "10.0.0.2:80": "slow_start"}
    clock.advance(30)
    assert {e.state(clock.now()) for e in endpoints.endpoints} == {"healthy"}
    await endpoints.close()


async def test_pick_prefers_untried_endpoints_and_falls_back_when_all_were_tried() -> None:
    clock = FakeClock()
    endpoints, _, _ = make_set(clock)
    await endpoints.start([A, B])
    first = endpoints.pick(None)
    second = endpoints.pick([first])
    assert second is not first
    third = endpoints.pick([first, second])  # both tried: any will do
    assert third in (first, second)
    await endpoints.close()


async def test_outlier_ejection_respects_the_percent_cap_and_ends_with_slow_start() -> None:
    clock = FakeClock()
    outliers = OutlierDetectionConfig(consecutive_failures=2, failure_rate=None, max_ejected_percent=50)
    endpoints, _, metrics = make_set(clock, outlier_detection=outliers, slow_start=Duration(10))
    await endpoints.start([A, B, C])
    a, b, _ = sorted(endpoints.endpoints, key=lambda e: e.address)
    for endpoint in (a, a, b, b):
        endpoints.record(endpoint, "reset", None, 0.001)
    assert a.state(clock.now()) == "ejected"
    assert b.state(clock.now()) == "healthy"  # a second one out would be 67% > 50%
    assert all(endpoints.pick(None) is not a for _ in range(20))
    clock.advance(31)  # base_ejection 30 s
    assert a.state(clock.now()) == "slow_start"
    assert a in [endpoints.pick(None) for _ in range(200)]
    registry = metrics.registry
    assert registry.get_sample_value("outrigger_outlier_ejections_total",
                                     {"upstream": "svc", "reason": "consecutive_failures"}) == 1
    assert registry.get_sample_value("outrigger_upstream_endpoints", {"upstream": "svc", "state": "slow_start"}) == 1
    await endpoints.close()
    assert registry.get_sample_value("outrigger_upstream_endpoints", {"upstream": "svc", "state": "healthy"}) is None


async def test_a_500_is_not_an_outlier_failure_but_a_503_is() -> None:
    clock = FakeClock()
    outliers = OutlierDetectionConfig(consecutive_failures=2, failure_rate=None)
    endpoints, _, _ = make_set(clock, outlier_detection=outliers)
    await endpoints.start([A, B])
    a = next(e for e in endpoints.endpoints if e.address == "10.0.0.1:80")
    for _ in range(5):
        endpoints.record(a, "http_5xx", 500, 0.001)
    assert not a.ejected(clock.now())
    for _ in range(2):
        endpoints.record(a, "http_5xx", 503, 0.001)
    assert a.ejected(clock.now())
    await endpoints.close()


async def test_an_empty_set_fails_the_attempt_as_a_connect_failure_naming_the_upstream() -> None:
    clock = FakeClock()
    endpoints, _, _ = make_set(clock)
    await endpoints.start([])
    with pytest.raises(errors.UpstreamConnectFailure, match="upstream svc has no endpoints"):
        endpoints.pick(None)
    await endpoints.close()


def test_endpoint_addresses_bracket_ipv6() -> None:
    endpoint = Endpoint("::1", 8080, cast(H1Pool, FakePool("::1", 8080)), cast(Any, None), None, 0.0, 0.0)
    assert endpoint.address == "[::1]:8080"
