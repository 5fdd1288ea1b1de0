"""Circuit breaker policy on fake time: how attempt outcomes are classified, and the fast-fail."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.chain import ProxyRequest, ProxyResponse, RequestBody
from proxy.clock import FakeClock
from proxy.config.types import CircuitBreakerConfig, OpenDurationConfig
from proxy.errors import (
    CircuitOpen,
    DeadlineExceeded,
    Overflow,
    ProxyError,
    UpstreamConnectFailure,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
    UpstreamTlsError,
)
from proxy.policies.breaker_state import BreakerState, CircuitBreaker
from proxy.policies.circuit_breaker import CircuitBreakerPolicy
from proxy.timers import Expiry, TimerWheel
from tests.support.spans import EventSpan, record_events

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN




def make(consecutive: int = 2, codes: tuple[int, ...] = (500, 502, 503, 504),
         half_open: int = 1) -> tuple[CircuitBreakerPolicy, CircuitBreaker, FakeClock]:
    clock = FakeClock()
    config = CircuitBreakerConfig(consecutive_failures=consecutive, half_open_requests=half_open,
                                  open_duration=OpenDurationConfig(min=1.0, max=8.0))  # type: ignore[arg-type]
    breaker = CircuitBreaker(config, clock, random.Random(1))
    return CircuitBreakerPolicy(breaker, codes, clock, "upstream svc"), breaker, clock


def make_slow_call() -> tuple[CircuitBreakerPolicy, CircuitBreaker, FakeClock]:
    """A breaker that opens only on the slow-call rate: half of 4 or more calls at 0.5 s or longer."""
    from proxy.config.types import SlowCallConfig
    clock = FakeClock()
    config = CircuitBreakerConfig(
        consecutive_failures=100, slow_call=SlowCallConfig(duration=0.5, rate_threshold=0.5, min_requests=4),  # type: ignore[arg-type]
        open_duration=OpenDurationConfig(min=1.0, max=8.0))  # type: ignore[arg-type]
    breaker = CircuitBreaker(config, clock, random.Random(1))
    return CircuitBreakerPolicy(breaker, (503,), clock, "upstream svc"), breaker, clock


def request() -> ProxyRequest:
    req = ProxyRequest("GET", "/", CIMultiDict(), RequestBody(None), request_id="rid")
    record_events(req)
    return req


def replying(status: int, took: float = 0.0, clock: FakeClock | None = None, queued: float = 0.0) -> Any:
    """An attempt answering ``status`` after ``queued`` s waiting for a bulkhead slot and ``took`` s upstream."""
    async def call_next(req: ProxyRequest) -> ProxyResponse:
        if clock is not None:
            clock.advance(queued + took)
        req.upstream_s += took  # as AttemptTelemetry, below the bulkhead, measures it
        return ProxyResponse(status, CIMultiDict())
    return call_next


def raising(error: type[ProxyError]) -> Any:
    async def call_next(req: ProxyRequest) -> ProxyResponse:
        raise error("scripted")
    return call_next


@pytest.mark.parametrize("status", [200, 204, 301, 400, 404, 429, 499])
async def test_non_failure_statuses_count_as_success(status: int) -> None:
    policy, breaker, _ = make(consecutive=1)
    for _ in range(5):
        assert (await policy(request(), replying(status))).status == status
    assert breaker.state is CLOSED


async def test_success_resets_the_consecutive_count() -> None:
    policy, breaker, _ = make(consecutive=2)
    await policy(request(), replying(503))
    await policy(request(), replying(404))
    await policy(request(), replying(503))
    assert breaker.state is CLOSED and breaker.consecutive_failures == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_failure_status_codes_trip_the_breaker(status: int) -> None:
    policy, breaker, _ = make(consecutive=2)
    for _ in range(2):
        response = await policy(request(), replying(status))
        assert response.status == status  # the response itself still goes back
    assert breaker.state is OPEN


async def test_only_configured_failure_codes_count() -> None:
    policy, breaker, _ = make(consecutive=1, codes=(503,))
    await policy(request(), replying(500))
    assert breaker.state is CLOSED
    await policy(request(), replying(503))
    assert breaker.state is OPEN


@pytest.mark.parametrize("error", [UpstreamConnectFailure, UpstreamReset, UpstreamProtocolError, UpstreamTimeout,
                                   UpstreamTlsError])
async def test_upstream_errors_count_as_failures(error: type[ProxyError]) -> None:
    policy, breaker, _ = make(consecutive=2)
    for _ in range(2):
        with pytest.raises(error):
            await policy(request(), raising(error))
    assert breaker.state is OPEN


@pytest.mark.parametrize("error", [Overflow, DeadlineExceeded])
async def test_shed_attempts_give_no_verdict(error: type[ProxyError]) -> None:
    policy, breaker, _ = make(consecutive=1)
    for _ in range(3):
        with pytest.raises(error):
            await policy(request(), raising(error))
    assert breaker.state is CLOSED and breaker.consecutive_failures == 0


async def test_open_breaker_fails_fast_with_retry_after_and_event() -> None:
    policy, breaker, clock = make(consecutive=1)
    await policy(request(), replying(503))
    assert breaker.state is OPEN
    calls = 0

    async def call_next(req: ProxyRequest) -> ProxyResponse:
        nonlocal calls
        calls += 1
        return ProxyResponse(200, CIMultiDict())

    req = request()
    with pytest.raises(CircuitOpen) as caught:
        await policy(req, call_next)
    assert calls == 0
    assert caught.value.status == 503 and caught.value.code == "circuit_open"
    assert caught.value.retry_after == pytest.approx(breaker.open_until - clock.now())
    assert 1.0 <= caught.value.retry_after <= 1.5  # type: ignore[operator]
    assert isinstance(req.span, EventSpan)
    assert [name for name, _ in req.span.events] == ["circuit_open"]


async def test_half_open_probe_success_closes_and_failure_reopens_longer() -> None:
    policy, breaker, clock = make(consecutive=1)
    await policy(request(), replying(503))
    first = breaker.open_until - breaker.entered_at
    clock.advance(breaker.retry_after())
    await policy(request(), replying(502))  # the probe fails: open again, for longer
    assert breaker.state is OPEN
    assert breaker.open_until - breaker.entered_at >= first
    clock.advance(breaker.retry_after())
    await policy(request(), replying(200))
    assert breaker.state is CLOSED


async def test_half_open_admits_only_the_configured_probes() -> None:
    policy, breaker, clock = make(consecutive=1, half_open=1)
    await policy(request(), replying(503))
    clock.advance(breaker.retry_after())
    probe_started = asyncio.Event()
    finish = asyncio.Event()

    async def slow_probe(req: ProxyRequest) -> ProxyResponse:
        probe_started.set()
        await finish.wait()
        return ProxyResponse(200, CIMultiDict())

    probe = asyncio.ensure_future(policy(request(), slow_probe))
    await probe_started.wait()
    assert breaker.state is HALF_OPEN
    with pytest.raises(CircuitOpen):
        await policy(request(), replying(200))
    finish.set()
    assert (await probe).status == 200
    assert breaker.state is CLOSED


async def test_cancelled_probe_frees_its_slot() -> None:
    policy, breaker, clock = make(consecutive=1)
    await policy(request(), replying(503))
    clock.advance(breaker.retry_after())
    started = asyncio.Event()

    async def hang(req: ProxyRequest) -> ProxyResponse:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    probe = asyncio.ensure_future(policy(request(), hang))
    await started.wait()
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.state is HALF_OPEN
    assert (await policy(request(), replying(200))).status == 200  # the next caller may probe
    assert breaker.state is CLOSED


async def test_cancellation_in_closed_state_is_not_a_failure() -> None:
    policy, breaker, _ = make(consecutive=1)

    async def cancelled(req: ProxyRequest) -> ProxyResponse:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await policy(request(), cancelled)
    assert breaker.state is CLOSED and breaker.consecutive_failures == 0


async def test_attempt_duration_feeds_the_slow_call_rate() -> None:
    policy, breaker, clock = make_slow_call()
    await policy(request(), replying(200, 0.01, clock))
    await policy(request(), replying(200, 0.01, clock))
    await policy(request(), replying(200, 0.9, clock))
    assert breaker.state is CLOSED
    await policy(request(), replying(200, 0.9, clock))
    assert breaker.state is OPEN


async def test_time_queued_in_the_bulkhead_is_not_upstream_slowness() -> None:
    policy, breaker, clock = make_slow_call()
    for _ in range(6):
        await policy(request(), replying(200, 0.3, clock, queued=0.9))  # 1.2s for the caller, 0.3s upstream
    assert breaker.state is CLOSED


def fired() -> Expiry:
    """The deadline policy's timer after it fired."""
    task = asyncio.current_task()
    assert task is not None
    expiry = Expiry(TimerWheel(), task, 0)
    expiry.expired = True
    return expiry


async def test_an_attempt_cut_off_by_the_deadline_while_on_the_upstream_is_a_failure() -> None:
    policy, breaker, clock = make(consecutive=2)

    async def hangs_past_the_deadline(req: ProxyRequest) -> ProxyResponse:
        clock.advance(0.3)
        req.upstream_s += 0.3
        raise asyncio.CancelledError  # what the deadline's timer does

    for _ in range(2):
        req = request()
        req.deadline_timer = fired()
        with pytest.raises(asyncio.CancelledError):
            await policy(req, hangs_past_the_deadline)
    assert breaker.state is OPEN


async def test_an_attempt_cancelled_before_the_deadline_or_before_reaching_the_upstream_is_no_verdict() -> None:
    policy, breaker, clock = make(consecutive=1)

    async def app_left(req: ProxyRequest) -> ProxyResponse:
        clock.advance(0.1)
        req.upstream_s += 0.1
        raise asyncio.CancelledError

    async def queued_until_the_deadline(req: ProxyRequest) -> ProxyResponse:
        clock.advance(0.5)  # never got a bulkhead slot: the upstream was not asked
        raise asyncio.CancelledError

    for call_next in (app_left, queued_until_the_deadline):
        req = request()
        if call_next is queued_until_the_deadline:
            req.deadline_timer = fired()
        with pytest.raises(asyncio.CancelledError):
            await policy(req, call_next)
    assert breaker.state is CLOSED and breaker.consecutive_failures == 0


async def test_a_call_admitted_before_the_trip_does_not_decide_the_half_open_probe() -> None:
    policy, breaker, clock = make(consecutive=1, half_open=1)
    release_old = asyncio.Event()

    async def slow_ok(req: ProxyRequest) -> ProxyResponse:
        await release_old.wait()
        return ProxyResponse(200, CIMultiDict())

    old_call = asyncio.ensure_future(policy(request(), slow_ok))  # admitted while CLOSED
    await asyncio.sleep(0)
    with pytest.raises(UpstreamReset):
        await policy(request(), raising(UpstreamReset))
    assert breaker.state is OPEN
    clock.advance(8.0)
    release_probe = asyncio.Event()

    async def probe_fails(req: ProxyRequest) -> ProxyResponse:
        await release_probe.wait()
        raise UpstreamReset("probe")

    probe = asyncio.ensure_future(policy(request(), probe_fails))
    await asyncio.sleep(0)
    assert breaker.state is HALF_OPEN
    release_old.set()
    assert (await old_call).status == 200
    assert breaker.state is HALF_OPEN  # the pre-trip success did not close it
    with pytest.raises(CircuitOpen):
        await policy(request(), replying(200))  # and the probe slot is still taken
    release_probe.set()
    with pytest.raises(UpstreamReset):
        await probe
    assert breaker.state is OPEN  # the real probe's failure decides
