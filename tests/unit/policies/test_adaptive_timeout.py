"""The adaptive attempt timeout on fake time: clamping, min_samples, the deadline, and learning."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from proxy.chain import ProxyRequest, ProxyResponse, RequestBody
from proxy.clock import FakeClock
from proxy.config.types import AdaptiveTimeoutConfig
from proxy.errors import UpstreamTimeout
from proxy.policies.adaptive_timeout import AdaptiveTimeout
from proxy.policies.latency import LatencySketch
from proxy.policies.timeout import AttemptTimeout
from proxy.telemetry.metrics import Metrics
from proxy.timers import TimerWheel


def adaptive(clock: FakeClock, attempt: float = 2.0, metrics: Metrics | None = None,
             **overrides: float) -> AdaptiveTimeout:
    values = {"percentile": 99.0, "multiplier": 2.0, "min": 0.02, "window": 30.0, "min_samples": 50, **overrides}
    config = AdaptiveTimeoutConfig(**values)  # type: ignore[arg-type]
    gauge = metrics.for_route("r", "u").adaptive_timeout if metrics is not None else None
    return AdaptiveTimeout(config, attempt, LatencySketch(config.window, clock), gauge)


def test_below_min_samples_the_fixed_attempt_is_used() -> None:
    clock = FakeClock()
    timeout = adaptive(clock)
    for _ in range(49):
        timeout.sketch.add(0.001)  # 49 very fast answers: not enough to trust
    assert timeout.current() == 2.0
    timeout.sketch.add(0.001)
    assert timeout.current() == 0.02  # the 50th: learned, and the floor holds it at min


def test_learned_value_is_percentile_times_multiplier() -> None:
    clock = FakeClock()
    timeout = adaptive(clock)
    for i in range(1000):
        timeout.sketch.add(0.005 + (i % 11) * 0.001)  # 5..15 ms
    assert timeout.current() == pytest.approx(0.030, rel=0.02)


def test_learned_value_never_exceeds_attempt() -> None:
    clock = FakeClock()
    timeout = adaptive(clock, attempt=0.5)
    for _ in range(100):
        timeout.sketch.add(0.4)
    assert timeout.current() == 0.5


def test_samples_expire_back_to_the_fixed_attempt() -> None:
    clock = FakeClock()
    timeout = adaptive(clock)
    for _ in range(100):
        timeout.sketch.add(0.010)
    assert timeout.current() == pytest.approx(0.020, rel=0.02)
    clock.advance(31.0)
    assert timeout.current() == 2.0


def test_gauge_shows_the_value_in_force() -> None:
    clock = FakeClock()
    metrics = Metrics(process_collectors=False)
    timeout = adaptive(clock, metrics=metrics)
    timeout.current()
    sample = metrics.registry.get_sample_value("outrigger_adaptive_timeout_seconds", {"route": "r", "upstream": "u"})
    assert sample == 2.0


def test_min_above_attempt_is_refused() -> None:
    with pytest.raises(ValueError, match=r"adaptive\.min"):
        adaptive(FakeClock(), attempt=0.01)


def request(deadline: float) -> ProxyRequest:
    req = ProxyRequest("GET", "/", CIMultiDict(), RequestBody(None), request_id="rid")
    req.deadline = deadline
    return req


async def test_attempt_learns_answers_and_applies_the_learned_timeout() -> None:
    clock = FakeClock()
    metrics = Metrics(process_collectors=False)
    timeout = adaptive(clock, min=0.01, min_samples=5)
    policy = AttemptTimeout(2.0, "u", metrics.for_route("r", "u"), TimerWheel(), adaptive=timeout, clock=clock)

    async def answer(req: ProxyRequest) -> ProxyResponse:
        clock.advance(0.010)
        return ProxyResponse(200, CIMultiDict())

    for _ in range(5):
        req = request(clock.now() + 10.0)
        await policy(req, answer)
        assert req.attempt_timeout_s == 2.0  # still below min_samples when each started
    req = request(clock.now() + 10.0)
    await policy(req, answer)
    assert req.attempt_timeout_s == pytest.approx(0.020, rel=0.02)


async def test_value_in_force_never_passes_the_remaining_deadline() -> None:
    clock = FakeClock()
    policy = AttemptTimeout(2.0, "u", Metrics(process_collectors=False).for_route("r", "u"), TimerWheel(),
                            adaptive=adaptive(clock), clock=clock)
    req = request(clock.now() + 0.3)

    async def ok(req: ProxyRequest) -> ProxyResponse:
        return ProxyResponse(200, CIMultiDict())

    await policy(req, ok)
    assert req.attempt_timeout_s == pytest.approx(0.3)


async def test_a_cut_off_attempt_counts_as_a_sample_at_its_timeout() -> None:
    """A lower bound of its latency: the learned value can grow out of a too-tight timeout."""
    clock = FakeClock()
    metrics = Metrics(process_collectors=False)
    timeout = adaptive(clock, attempt=0.05, min=0.001, min_samples=1)
    timeout.sketch.add(0.002)
    policy = AttemptTimeout(0.05, "u", metrics.for_route("r", "u"), TimerWheel(), adaptive=timeout, clock=clock)

    async def hang(req: ProxyRequest) -> ProxyResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    in_force = timeout.current()
    with pytest.raises(UpstreamTimeout, match="attempt timeout"):
        await policy(request(clock.now() + 10.0), hang)  # real loop time: a few milliseconds
    assert timeout.sketch.count() == 2
    assert timeout.sketch.quantile(100) == pytest.approx(in_force, rel=0.02)
    assert timeout.current() > in_force


async def test_5xx_and_429_answers_are_not_learned() -> None:
    clock = FakeClock()
    sketch = LatencySketch(30.0, clock)
    policy = AttemptTimeout(2.0, "u", Metrics(process_collectors=False).for_route("r", "u"), TimerWheel(),
                            sketch=sketch, clock=clock)
    for status in (503, 429, 500, 200, 404):
        async def answer(req: ProxyRequest, status: int = status) -> ProxyResponse:
            return ProxyResponse(status, CIMultiDict())
        await policy(request(clock.now() + 10.0), answer)
    assert sketch.count() == 2


def test_each_retry_waits_twice_as_long_up_to_attempt() -> None:
    """A learned value that lags a slowdown costs a retry, not the request."""
    clock = FakeClock()
    timeout = adaptive(clock, attempt=0.1)
    for _ in range(100):
        timeout.sketch.add(0.010)
    learned = timeout.current(1)
    assert learned == pytest.approx(0.020, rel=0.02)
    assert [timeout.current(n) for n in (2, 3, 4)] == [learned * 2, learned * 4, 0.1]


async def test_a_retry_after_a_cut_off_gets_the_doubled_timeout() -> None:
    clock = FakeClock()
    timeout = adaptive(clock)
    for _ in range(100):
        timeout.sketch.add(0.010)
    policy = AttemptTimeout(2.0, "u", Metrics(process_collectors=False).for_route("r", "u"), TimerWheel(),
                            adaptive=timeout, clock=clock)
    req = request(clock.now() + 10.0)
    req.attempt = 2

    async def ok(req: ProxyRequest) -> ProxyResponse:
        return ProxyResponse(200, CIMultiDict())

    await policy(req, ok)
    assert req.attempt_timeout_s == pytest.approx(0.040, rel=0.02)


async def test_a_cut_off_below_attempt_is_no_breaker_failure_but_one_at_attempt_is() -> None:
    """Five learned cut-offs in a row during a slowdown must not open the breaker."""
    clock = FakeClock()
    timeout = adaptive(clock, attempt=0.05, min=0.001, min_samples=1)
    timeout.sketch.add(0.001)
    policy = AttemptTimeout(0.05, "u", Metrics(process_collectors=False).for_route("r", "u"), TimerWheel(),
                            adaptive=timeout, clock=clock)

    async def hang(req: ProxyRequest) -> ProxyResponse:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    with pytest.raises(UpstreamTimeout) as learned:
        await policy(request(clock.now() + 10.0), hang)
    assert learned.value.breaker_failure is False and learned.value.retry_kind == "timeout"
    assert learned.value.code == "upstream_timeout"
    fixed = AttemptTimeout(0.002, "u", Metrics(process_collectors=False).for_route("r", "u"), TimerWheel(),
                           sketch=LatencySketch(30.0, clock), clock=clock)
    with pytest.raises(UpstreamTimeout) as ceiling:
        await fixed(request(clock.now() + 10.0), hang)
    assert ceiling.value.breaker_failure is True
