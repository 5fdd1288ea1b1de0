"""The AIMD concurrency limit on fake time, alone and inside the bulkhead."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from proxy.chain import ProxyRequest, ProxyResponse, RequestBody
from proxy.clock import FakeClock
from proxy.config.types import AdaptiveConcurrencyConfig, ConcurrencyConfig
from proxy.errors import UpstreamConnectFailure, UpstreamReset, UpstreamTimeout
from proxy.policies.aimd import AimdLimit
from proxy.policies.bulkhead import Bulkhead
from proxy.telemetry.metrics import Metrics


def limiter(clock: FakeClock, initial: int = 20, minimum: int = 4, ratio: float = 0.9,
            max_active: int = 100) -> AimdLimit:
    config = AdaptiveConcurrencyConfig(initial=initial, min=minimum, decrease_ratio=ratio)
    return AimdLimit(config, max_active, clock)


def test_limit_grows_by_one_per_window_of_successes() -> None:
    aimd = limiter(FakeClock(), initial=10)
    for _ in range(9):
        aimd.on_success(inflight=10)
    assert aimd.limit == 10
    aimd.on_success(inflight=10)
    assert aimd.limit == 11  # ten successes at a limit of ten: +1


def test_an_underused_limit_does_not_grow() -> None:
    aimd = limiter(FakeClock(), initial=10)
    for _ in range(100):
        aimd.on_success(inflight=4)  # less than half of the limit in use
    assert aimd.limit == 10


def test_a_drop_cuts_the_limit_once_per_congestion_event() -> None:
    clock = FakeClock()
    aimd = limiter(clock, initial=20)
    started = clock.now()
    clock.advance(0.1)
    for _ in range(10):
        aimd.on_drop(started)  # ten attempts sent under the old limit all time out
    assert aimd.limit == 18
    aimd.on_drop(clock.now())  # one sent after the cut: a new event
    assert aimd.limit == 16


def test_limit_stays_within_min_and_max_active() -> None:
    clock = FakeClock()
    aimd = limiter(clock, initial=5, minimum=4, max_active=6)
    for _ in range(10):
        aimd.on_drop(clock.now())
        clock.advance(0.01)
    assert aimd.limit == 4
    for _ in range(100):
        aimd.on_success(inflight=6)
    assert aimd.limit == 6


def test_min_above_initial_is_refused() -> None:
    with pytest.raises(ValueError, match="min"):
        AdaptiveConcurrencyConfig(initial=2, min=4)


def make(clock: FakeClock, initial: int = 2) -> tuple[Bulkhead, Metrics]:
    metrics = Metrics(process_collectors=False)
    config = ConcurrencyConfig(max_active=10, max_pending=10, adaptive=AdaptiveConcurrencyConfig(
        initial=initial, min=1, decrease_ratio=0.5))
    return Bulkhead(config, "svc", metrics.for_upstream("svc"), clock), metrics


def request() -> ProxyRequest:
    return ProxyRequest("GET", "/", CIMultiDict(), RequestBody(None), request_id="rid")


def limit_gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("outrigger_concurrency_limit", {"upstream": "svc"})


@pytest.mark.parametrize("failure", [UpstreamTimeout("t"), UpstreamConnectFailure("c")])
async def test_timeouts_and_connect_failures_are_drops(failure: Exception) -> None:
    clock = FakeClock()
    bulkhead, metrics = make(clock, initial=4)

    async def fail(req: ProxyRequest) -> ProxyResponse:
        raise failure

    with pytest.raises(type(failure)):
        await bulkhead(request(), fail)
    assert bulkhead.aimd is not None and bulkhead.aimd.limit == 2
    assert limit_gauge(metrics) == 2
    assert bulkhead.active == 0


@pytest.mark.parametrize(("status", "limit"), [(503, 2), (429, 2), (500, 4), (404, 4)])
async def test_503_and_429_are_drops_other_answers_are_not(status: int, limit: int) -> None:
    bulkhead, _ = make(FakeClock(), initial=4)

    async def answer(req: ProxyRequest) -> ProxyResponse:
        return ProxyResponse(status, CIMultiDict())

    (await bulkhead(request(), answer)).release()
    assert bulkhead.aimd is not None and bulkhead.aimd.limit == limit


async def test_a_reset_is_not_a_drop() -> None:
    bulkhead, _ = make(FakeClock(), initial=4)

    async def reset(req: ProxyRequest) -> ProxyResponse:
        raise UpstreamReset("r")

    with pytest.raises(UpstreamReset):
        await bulkhead(request(), reset)
    assert bulkhead.aimd is not None and bulkhead.aimd.limit == 4


async def test_the_bulkhead_admits_up_to_the_adaptive_limit_and_a_raise_admits_waiters() -> None:
    clock = FakeClock()
    bulkhead, metrics = make(clock, initial=2)
    gate = asyncio.Event()
    started = 0

    async def held(req: ProxyRequest) -> ProxyResponse:
        nonlocal started
        started += 1
        await gate.wait()
        return ProxyResponse(200, CIMultiDict())

    tasks = [asyncio.ensure_future(bulkhead(request(), held)) for _ in range(4)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert (started, bulkhead.active, bulkhead.pending) == (2, 2, 2)
    assert limit_gauge(metrics) == 2
    assert bulkhead.aimd is not None
    bulkhead.aimd.on_success(inflight=2)
    bulkhead.aimd.on_success(inflight=2)  # a window of two successes at a limit of two: 3
    for _ in range(5):
        await asyncio.sleep(0)
    assert (started, bulkhead.active) == (3, 3)
    gate.set()
    for response in await asyncio.gather(*tasks):
        response.release()
    assert (bulkhead.active, bulkhead.pending) == (0, 0)


async def test_a_cut_limit_retires_slots_as_they_are_released() -> None:
    clock = FakeClock()
    bulkhead, _ = make(clock, initial=4)

    async def ok(req: ProxyRequest) -> ProxyResponse:
        return ProxyResponse(200, CIMultiDict())

    responses = [await bulkhead(request(), ok) for _ in range(4)]
    assert bulkhead.active == 4
    assert bulkhead.aimd is not None
    bulkhead.aimd.on_drop(clock.now())  # 4 x 0.5
    assert not bulkhead.has_room
    responses.pop().release()
    responses.pop().release()
    assert bulkhead.active == 2 and not bulkhead.has_room
    responses.pop().release()
    assert bulkhead.has_room
