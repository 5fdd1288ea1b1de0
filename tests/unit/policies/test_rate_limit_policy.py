"""Rate limit policy on fake time: 429 headers, keyed buckets and queue mode."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.chain import ProxyRequest, ProxyResponse, RequestBody
from proxy.clock import FakeClock
from proxy.config.types import RateLimitConfig, RateLimitKey
from proxy.errors import RateLimited
from proxy.policies.rate_limit import RateLimit
from proxy.telemetry.metrics import Metrics
from tests.support.spans import EventSpan, record_events


class Counting:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        self.calls += 1
        return ProxyResponse(200, CIMultiDict())


def make(**overrides: Any) -> tuple[RateLimit, FakeClock, Metrics]:
    clock = FakeClock()
    metrics = Metrics(process_collectors=False)
    fields: dict[str, Any] = {"requests_per_second": 10.0, "burst": 3}
    fields.update(overrides)
    return RateLimit(RateLimitConfig(**fields), clock, metrics.for_route("r", "u")), clock, metrics


def request(tenant: str | None = None) -> ProxyRequest:
    headers: CIMultiDict[str] = CIMultiDict()
    if tenant is not None:
        headers["x-tenant"] = tenant
    req = ProxyRequest("GET", "/", headers, RequestBody(None), request_id="rid")
    record_events(req)
    return req


def limited(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("outrigger_rate_limited_total", {"route": "r"}) or 0.0


async def test_burst_passes_then_429_with_ietf_headers() -> None:
    limiter, _, metrics = make(requests_per_second=2.0, burst=3)
    upstream = Counting()
    for _ in range(3):
        assert (await limiter(request(), upstream)).status == 200
    req = request()
    with pytest.raises(RateLimited) as caught:
        await limiter(req, upstream)
    error = caught.value
    assert (error.status, error.code) == (429, "rate_limited")
    assert error.retry_after == pytest.approx(0.5)  # one token at 2/s
    assert error.headers == {"RateLimit-Limit": "3", "RateLimit-Remaining": "0", "RateLimit-Reset": "2"}
    assert upstream.calls == 3
    assert limited(metrics) == 1
    assert isinstance(req.span, EventSpan)
    assert [name for name, _ in req.span.events] == ["rate_limited"]


async def test_retry_after_header_is_whole_seconds_at_least_one() -> None:
    from proxy.errors import to_response
    limiter, _, _ = make(requests_per_second=10.0, burst=1)
    await limiter(request(), Counting())
    with pytest.raises(RateLimited) as caught:
        await limiter(request(), Counting())
    response = to_response(caught.value, route="r", upstream="u", request_id="rid")
    assert response.status == 429
    assert response.headers["Retry-After"] == "1"
    assert response.headers["x-outrigger-error"] == "rate_limited"
    assert response.headers["RateLimit-Limit"] == "1"
    assert response.headers["RateLimit-Remaining"] == "0"
    assert response.headers["RateLimit-Reset"] == "1"


async def test_remaining_counts_down_and_tokens_refill() -> None:
    limiter, clock, _ = make(requests_per_second=10.0, burst=5)
    for _ in range(5):
        await limiter(request(), Counting())
    with pytest.raises(RateLimited) as caught:
        await limiter(request(), Counting())
    assert caught.value.headers is not None and caught.value.headers["RateLimit-Reset"] == "1"
    clock.advance(0.2)
    assert limiter.snapshot() == {"tokens": pytest.approx(2.0)}
    await limiter(request(), Counting())
    await limiter(request(), Counting())
    with pytest.raises(RateLimited):
        await limiter(request(), Counting())


async def test_accepted_rate_matches_configured_rate_over_time() -> None:
    limiter, clock, _ = make(requests_per_second=100.0, burst=1)
    upstream = Counting()
    for _ in range(10_000):  # 1000 rps offered for 10 s
        clock.advance(0.001)
        with contextlib.suppress(RateLimited):
            await limiter(request(), upstream)
    assert upstream.calls == pytest.approx(1000, abs=2)


async def test_keyed_buckets_are_independent_per_header_value() -> None:
    limiter, _, _ = make(requests_per_second=1.0, burst=2, key=RateLimitKey(header="x-tenant"))
    upstream = Counting()
    for tenant in ("a", "a", "b", "b"):
        await limiter(request(tenant), upstream)
    with pytest.raises(RateLimited):
        await limiter(request("a"), upstream)
    with pytest.raises(RateLimited):
        await limiter(request("b"), upstream)
    await limiter(request("c"), upstream)
    assert upstream.calls == 5
    assert limiter.snapshot() == {"keys": 3}


async def test_requests_without_the_key_header_share_one_bucket() -> None:
    limiter, _, _ = make(requests_per_second=1.0, burst=1, key=RateLimitKey(header="x-tenant"))
    await limiter(request(), Counting())
    with pytest.raises(RateLimited):
        await limiter(request(), Counting())


async def test_keyed_buckets_evict_least_recently_used_past_max_keys() -> None:
    limiter, _, _ = make(requests_per_second=1.0, burst=1, key=RateLimitKey(header="x-tenant"), max_keys=2)
    for tenant in ("a", "b", "c"):
        await limiter(request(tenant), Counting())
    assert limiter.snapshot() == {"keys": 2}
    await limiter(request("a"), Counting())  # evicted, so it starts full again


async def test_queue_mode_waits_for_a_token_within_max_wait() -> None:
    limiter, clock, metrics = make(requests_per_second=10.0, burst=1, mode="queue", max_wait=0.25)
    upstream = Counting()
    await limiter(request(), upstream)
    req = request()
    assert (await limiter(req, upstream)).status == 200
    assert clock.sleeps == [pytest.approx(0.1)]
    assert upstream.calls == 2
    assert limited(metrics) == 0
    assert isinstance(req.span, EventSpan)
    assert [name for name, _ in req.span.events] == ["rate_limit_queued"]


async def test_queue_mode_rejects_when_the_wait_exceeds_max_wait() -> None:
    limiter, clock, metrics = make(requests_per_second=10.0, burst=1, mode="queue", max_wait=0.15)
    upstream = Counting()
    await limiter(request(), upstream)
    clock.sleeps.clear()
    # Queued callers hold debt without sleeping in between, as concurrent arrivals would.
    waits = [limiter.bucket_for(request()).reserve(0.15) for _ in range(2)]
    assert waits == [pytest.approx(0.1), None]
    with pytest.raises(RateLimited):
        await limiter(request(), upstream)
    assert limited(metrics) == 1


class ArrivalsClock(FakeClock):
    """Sleeps are recorded but do not move time, so every caller arrives at the same instant."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(0)


async def test_queue_mode_serves_concurrent_waiters_at_the_configured_rate() -> None:
    clock = ArrivalsClock()
    config = RateLimitConfig(requests_per_second=10.0, burst=1, mode="queue", max_wait=0.35)  # type: ignore[arg-type]
    limiter = RateLimit(config, clock, Metrics(process_collectors=False).for_route("r", "u"))
    upstream = Counting()
    results = await asyncio.gather(*(limiter(request(), upstream) for _ in range(6)), return_exceptions=True)
    served = [r for r in results if isinstance(r, ProxyResponse)]
    assert len(served) == 4  # one now, then 0.1, 0.2, 0.3 s of debt; a 0.4 s wait is over max_wait
    assert sum(isinstance(r, RateLimited) for r in results) == 2
    assert sorted(clock.sleeps) == pytest.approx([0.1, 0.2, 0.3])


async def test_queue_mode_never_waits_past_the_total_timeout_and_hands_the_rest_to_the_deadline() -> None:
    config = RateLimitConfig(requests_per_second=10.0, burst=1, mode="queue", max_wait=1.0)  # type: ignore[arg-type]
    for total, admitted in ((0.08, False), (0.15, True)):  # the next token is due in 0.1s
        clock = FakeClock()
        limiter = RateLimit(config, clock, Metrics(process_collectors=False).for_route("r", "u"))
        upstream = Counting()
        await limiter(request(), upstream)  # the burst token
        queued = request()
        queued.timeout_override = total  # the time left, as the edge hands the request over
        if admitted:
            assert (await limiter(queued, upstream)).status == 200
            assert clock.sleeps == [pytest.approx(0.1)]
            assert queued.timeout_override == pytest.approx(0.05)  # the deadline gets what the wait left
        else:
            with pytest.raises(RateLimited):  # refused at once: waiting would pass the deadline
                await limiter(queued, upstream)
            assert clock.sleeps == []
        assert upstream.calls == (2 if admitted else 1)


async def test_queue_mode_wait_is_bounded_by_the_apps_tighter_timeout_header() -> None:
    clock = FakeClock()
    config = RateLimitConfig(requests_per_second=10.0, burst=1, mode="queue", max_wait=1.0)  # type: ignore[arg-type]
    limiter = RateLimit(config, clock, Metrics(process_collectors=False).for_route("r", "u"))
    upstream = Counting()
    await limiter(request(), upstream)
    tight = request()
    tight.timeout_override = 0.05  # x-outrigger-timeout-ms: 50
    with pytest.raises(RateLimited):
        await limiter(tight, upstream)
    assert upstream.calls == 1
