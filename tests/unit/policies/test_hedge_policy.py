"""Hedging: who may be hedged, the first head wins, losers, the extra-load cap and the shared budget.

The extra-load and retry-budget windows run on a fake clock; the hedge delay itself is a real
loop wait of a millisecond or so, against tries that answer in milliseconds or never.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.chain import ProxyRequest, ProxyResponse, RequestBody
from proxy.clock import FakeClock
from proxy.config.types import HedgeConfig
from proxy.errors import UpstreamReset
from proxy.policies.budget import RetryBudget
from proxy.policies.hedge import Hedge, HedgeTokens
from proxy.policies.latency import LatencySketch
from proxy.telemetry.metrics import Metrics


def make(clock: FakeClock, *, delay: str | float = 0.001, max_extra_load: float = 1.0,
         budget: RetryBudget | None = None, spare: int = 1, sketch: LatencySketch | None = None,
         **overrides: Any) -> tuple[Hedge, Metrics, RetryBudget]:
    metrics = Metrics(process_collectors=False)
    budget = budget or RetryBudget(0.0, 1000.0, 10.0, clock)
    config = HedgeConfig(delay=delay, max_extra_load=max_extra_load, **overrides)
    hedge = Hedge(config, sketch=sketch, min_samples=10, budget=budget, record_requests=True,
                  clock=clock, metrics=metrics.for_route("r", "u"), spare=lambda: spare)
    return hedge, metrics, budget


def hedges(metrics: Metrics, result: str) -> float:
    labels = {"route": "r", "upstream": "u", "result": result}
    return metrics.registry.get_sample_value("outrigger_hedges_total", labels) or 0.0


def request(method: str = "GET", headers: dict[str, str] | None = None,
            body: RequestBody | None = None) -> ProxyRequest:
    req = ProxyRequest(method, "/", CIMultiDict(headers or {}), body or RequestBody(None), request_id="rid")
    req.deadline = float("inf")
    return req


class Upstream:
    """First tries wait ``slow`` seconds (or forever); hedges answer at once."""

    def __init__(self, slow: float | None = None) -> None:
        self.slow = slow
        self.tries: list[bool] = []  # hedge flag per try
        self.cancelled = 0
        self.released = 0
        self.finish = asyncio.Event()

    async def __call__(self, req: ProxyRequest) -> ProxyResponse:
        self.tries.append(req.hedge)
        if not req.hedge:
            try:
                if self.slow is None:
                    await self.finish.wait()
                else:
                    await asyncio.sleep(self.slow)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        response = ProxyResponse(200, CIMultiDict({"x-hedge": str(req.hedge)}))
        response.on_release(self._released)
        return response

    def _released(self) -> None:
        self.released += 1


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_hedge_wins_against_a_slow_first_try_and_the_loser_is_cancelled() -> None:
    hedge, metrics, _ = make(FakeClock(), spare=1)
    upstream = Upstream()
    response = await hedge(request(), upstream)
    assert response.headers["x-hedge"] == "True"
    assert upstream.tries == [False, True]
    await settle()
    assert upstream.cancelled == 1
    assert (hedges(metrics, "won"), hedges(metrics, "lost")) == (1, 0)


async def test_loser_is_left_to_finish_and_released_when_the_pool_has_no_spare_connection() -> None:
    hedge, _, _ = make(FakeClock(), spare=0)
    upstream = Upstream()
    response = await hedge(request(), upstream)
    assert response.headers["x-hedge"] == "True"
    await settle()
    assert upstream.cancelled == 0 and upstream.released == 0
    upstream.finish.set()
    await settle()
    assert upstream.released == 1  # the loser's answer was discarded, its slot and connection given back


async def test_fast_first_try_sends_no_hedge() -> None:
    hedge, metrics, _ = make(FakeClock(), delay=1.0)
    upstream = Upstream(slow=0.0)
    await hedge(request(), upstream)
    assert upstream.tries == [False]
    assert hedges(metrics, "suppressed") == 0


@pytest.mark.parametrize(("method", "headers", "hedged"), [
    ("GET", {}, True), ("PUT", {}, True), ("POST", {}, False), ("POST", {"Idempotency-Key": "k1"}, True),
])
async def test_only_idempotent_requests_are_hedged(method: str, headers: dict[str, str], hedged: bool) -> None:
    hedge, _, _ = make(FakeClock())
    upstream = Upstream(slow=0.02)
    await hedge(request(method, headers, RequestBody(b"payload")), upstream)
    assert (True in upstream.tries) is hedged


async def test_a_streamed_body_is_never_hedged() -> None:
    async def chunks() -> Any:
        yield b"x"

    hedge, _, _ = make(FakeClock())
    upstream = Upstream(slow=0.02)
    await hedge(request("PUT", body=RequestBody(prefix=b"p", stream=chunks())), upstream)
    assert upstream.tries == [False]


async def test_hedges_never_exceed_max_extra_load_of_requests() -> None:
    hedge, metrics, _ = make(FakeClock(), max_extra_load=0.05)
    upstream = Upstream(slow=0.01)  # every first try is slow
    for _ in range(10):
        await asyncio.gather(*(hedge(request(), upstream) for _ in range(20)))
    assert upstream.tries.count(True) == 10  # 5% of 200
    assert hedges(metrics, "suppressed") == 190


async def test_a_quiet_stretch_banks_at_most_a_hundred_requests_worth_of_hedges() -> None:
    """An outage after an hour of fast answers cannot spend the hour's allowance at once."""
    hedge, _, _ = make(FakeClock(), max_extra_load=0.05)
    fast = Upstream(slow=0.0)
    await asyncio.gather(*(hedge(request(), fast) for _ in range(1000)))
    assert fast.tries.count(True) == 0
    slow = Upstream(slow=0.01)
    await asyncio.gather(*(hedge(request(), slow) for _ in range(100)))
    assert slow.tries.count(True) == 5  # the bank (100 x 5% = 5), since all 100 came at once


def test_hedge_tokens_fill_per_request_up_to_the_bank() -> None:
    tokens = HedgeTokens(0.05)
    for _ in range(19):
        tokens.record_request()
    assert tokens.tokens < 1.0
    tokens.record_request()
    assert tokens.tokens == pytest.approx(1.0)
    for _ in range(1000):
        tokens.record_request()
    assert tokens.tokens == tokens.capacity == 5.0
    with pytest.raises(ValueError, match="max_extra_load"):
        HedgeTokens(0.0)


async def test_hedges_and_retries_share_the_retry_budget() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.0, 0.1, 10.0, clock)  # one token in the window
    hedge, metrics, _ = make(clock, budget=budget)
    upstream = Upstream(slow=0.02)
    await hedge(request(), upstream)
    await hedge(request(), upstream)
    assert upstream.tries.count(True) == 1
    assert budget.remaining() == 0
    assert hedges(metrics, "suppressed") == 1


async def test_auto_delay_waits_for_enough_samples() -> None:
    clock = FakeClock()
    sketch = LatencySketch(30.0, clock)
    hedge, _, _ = make(clock, delay="auto", sketch=sketch, percentile=50)
    assert hedge.delay() is None
    for _ in range(10):
        sketch.add(0.002)
    assert hedge.delay() == pytest.approx(0.002, rel=0.02)
    upstream = Upstream(slow=0.05)
    await hedge(request(), upstream)
    assert upstream.tries == [False, True]


async def test_a_failed_try_leaves_the_other_running_and_all_failing_raises() -> None:
    hedge, _, _ = make(FakeClock())
    calls: list[bool] = []

    async def hedge_answers_late(req: ProxyRequest) -> ProxyResponse:
        calls.append(req.hedge)
        if not req.hedge:
            await asyncio.sleep(0.01)
            raise UpstreamReset("first try reset")
        await asyncio.sleep(0.03)
        return ProxyResponse(200, CIMultiDict())

    assert (await hedge(request(), hedge_answers_late)).status == 200

    async def both_fail(req: ProxyRequest) -> ProxyResponse:
        await asyncio.sleep(0.01)
        raise UpstreamReset("reset")

    with pytest.raises(UpstreamReset):
        await hedge(request(), both_fail)


async def test_a_cancelled_request_cancels_every_try() -> None:
    hedge, _, _ = make(FakeClock())
    started: list[bool] = []
    cancelled: list[bool] = []
    both = asyncio.Event()

    async def forever(req: ProxyRequest) -> ProxyResponse:
        started.append(req.hedge)
        if len(started) == 2:
            both.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(req.hedge)
            raise
        raise AssertionError("unreachable")

    task = asyncio.ensure_future(hedge(request(), forever))
    await both.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle()
    assert sorted(cancelled) == [False, True]
