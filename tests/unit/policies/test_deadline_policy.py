"""Deadline (total timeout) and attempt timeout: what they stamp, what they raise, what they count.

Both time out on the event loop's clock; the waits here are a few milliseconds at most.
"""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from proxy.chain import ProxyRequest, ProxyResponse, RequestBody
from proxy.clock import FakeClock
from proxy.errors import DeadlineExceeded, UpstreamTimeout
from proxy.policies.deadline import Deadline
from proxy.policies.timeout import AttemptTimeout
from proxy.telemetry.metrics import Metrics
from proxy.timers import TimerWheel
from tests.support.spans import EventSpan, record_events


def request(timeout_override: float | None = None) -> ProxyRequest:
    req = ProxyRequest("GET", "/", CIMultiDict(), RequestBody(None), request_id="rid",
                       timeout_override=timeout_override)
    record_events(req)
    return req


async def hang(req: ProxyRequest) -> ProxyResponse:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def ok(req: ProxyRequest) -> ProxyResponse:
    return ProxyResponse(200, CIMultiDict())


def timeouts(metrics: Metrics, kind: str) -> float:
    labels = {"route": "r", "upstream": "u", "kind": kind}
    return metrics.registry.get_sample_value("outrigger_timeouts_total", labels) or 0.0


async def test_deadline_is_stamped_on_the_request() -> None:
    clock = FakeClock()
    deadline = Deadline(5.0, clock, Metrics(process_collectors=False).for_route("r", "u"), TimerWheel())
    req = request()
    assert (await deadline(req, ok)).status == 200
    assert req.deadline == clock.now() + 5.0


async def test_timeout_override_tightens_the_deadline() -> None:
    clock = FakeClock()
    deadline = Deadline(5.0, clock, Metrics(process_collectors=False).for_route("r", "u"), TimerWheel())
    req = request(timeout_override=0.5)
    await deadline(req, ok)
    assert req.deadline == clock.now() + 0.5


async def test_timeout_override_never_loosens_the_deadline() -> None:
    clock = FakeClock()
    deadline = Deadline(5.0, clock, Metrics(process_collectors=False).for_route("r", "u"), TimerWheel())
    req = request(timeout_override=60.0)
    await deadline(req, ok)
    assert req.deadline == clock.now() + 5.0


async def test_deadline_exceeded_is_504_with_event_and_metric() -> None:
    metrics = Metrics(process_collectors=False)
    deadline = Deadline(0.001, FakeClock(), metrics.for_route("r", "u"), TimerWheel())
    req = request()

    async def two_attempts(r: ProxyRequest) -> ProxyResponse:
        r.attempt = 2
        return await hang(r)

    with pytest.raises(DeadlineExceeded) as caught:
        await deadline(req, two_attempts)
    assert (caught.value.status, caught.value.code) == (504, "deadline_exceeded")
    assert timeouts(metrics, "total") == 1
    assert isinstance(req.span, EventSpan)
    assert [name for name, _ in req.span.events] == ["deadline_exceeded"]


async def test_a_timeout_error_from_below_is_not_mistaken_for_the_deadline() -> None:
    metrics = Metrics(process_collectors=False)
    deadline = Deadline(5.0, FakeClock(), metrics.for_route("r", "u"), TimerWheel())

    async def raises_timeout(r: ProxyRequest) -> ProxyResponse:
        raise TimeoutError("some library's own timeout")

    with pytest.raises(TimeoutError) as caught:
        await deadline(request(), raises_timeout)
    assert not isinstance(caught.value, DeadlineExceeded)
    assert timeouts(metrics, "total") == 0


async def test_attempt_timeout_raises_upstream_timeout_and_counts() -> None:
    metrics = Metrics(process_collectors=False)
    attempt = AttemptTimeout(0.001, "svc", metrics.for_route("r", "u"), TimerWheel())
    with pytest.raises(UpstreamTimeout) as caught:
        await attempt(request(), hang)
    assert caught.value.retry_kind == "timeout" and caught.value.breaker_failure
    assert timeouts(metrics, "attempt") == 1
    assert (await attempt(request(), ok)).status == 200


async def test_deadline_wins_over_a_longer_attempt_timeout() -> None:
    metrics = Metrics(process_collectors=False)
    route = metrics.for_route("r", "u")
    wheel = TimerWheel()  # one per sidecar, shared, as proxy.app builds them
    deadline = Deadline(0.001, FakeClock(), route, wheel)
    attempt = AttemptTimeout(5.0, "svc", route, wheel)

    async def inner(req: ProxyRequest) -> ProxyResponse:
        return await attempt(req, hang)

    with pytest.raises(DeadlineExceeded):
        await deadline(request(), inner)
    assert (timeouts(metrics, "total"), timeouts(metrics, "attempt")) == (1, 0)


async def test_outer_cancellation_passes_through_both_timeouts() -> None:
    metrics = Metrics(process_collectors=False)
    route = metrics.for_route("r", "u")
    wheel = TimerWheel()
    deadline = Deadline(5.0, FakeClock(), route, wheel)
    attempt = AttemptTimeout(5.0, "svc", route, wheel)

    async def inner(req: ProxyRequest) -> ProxyResponse:
        return await attempt(req, hang)

    task = asyncio.ensure_future(deadline(request(), inner))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (timeouts(metrics, "total"), timeouts(metrics, "attempt")) == (0, 0)
