"""Bulkhead: max_active, the bounded pending queue, overflow, and slots that never leak."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.chain import ProxyRequest, ProxyResponse, RequestBody
from proxy.config.types import ConcurrencyConfig
from proxy.errors import Overflow, UpstreamReset
from proxy.policies.bulkhead import Bulkhead
from proxy.telemetry.metrics import Metrics


class Gate:
    """A ``call_next`` whose attempts wait until the test lets them answer."""

    def __init__(self) -> None:
        self.started = 0
        self.open = asyncio.Event()

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        self.started += 1
        await self.open.wait()
        return ProxyResponse(200, CIMultiDict())


def make(max_active: int = 2, max_pending: int = 1, pending_timeout: float = 1.0) -> tuple[Bulkhead, Metrics]:
    metrics = Metrics(process_collectors=False)
    config = ConcurrencyConfig(max_active=max_active, max_pending=max_pending,
                               pending_timeout=pending_timeout)  # type: ignore[arg-type]
    return Bulkhead(config, "svc", metrics.for_upstream("svc")), metrics


def request() -> ProxyRequest:
    return ProxyRequest("GET", "/", CIMultiDict(), RequestBody(None), request_id="rid")


def rejected(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("outrigger_bulkhead_rejected_total", {"upstream": "svc"}) or 0.0


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_admits_up_to_max_active_then_queues_then_overflows() -> None:
    bulkhead, metrics = make(max_active=2, max_pending=1)
    gate = Gate()
    tasks = [asyncio.ensure_future(bulkhead(request(), gate)) for _ in range(3)]
    await settle()
    assert (bulkhead.active, bulkhead.pending, gate.started) == (2, 1, 2)
    with pytest.raises(Overflow) as caught:
        await bulkhead(request(), gate)
    assert caught.value.status == 503 and caught.value.code == "overflow"
    assert "queue full" in caught.value.message
    assert rejected(metrics) == 1
    gate.open.set()
    for task in tasks:
        (await task).release()  # the queued third attempt starts only once a slot is released
    assert gate.started == 3
    assert (bulkhead.active, bulkhead.pending) == (0, 0)


async def test_zero_max_pending_overflows_at_once() -> None:
    bulkhead, _ = make(max_active=1, max_pending=0)
    gate = Gate()
    first = asyncio.ensure_future(bulkhead(request(), gate))
    await settle()
    with pytest.raises(Overflow):
        await bulkhead(request(), gate)
    gate.open.set()
    (await first).release()
    assert bulkhead.active == 0


async def test_pending_timeout_overflows() -> None:
    bulkhead, metrics = make(max_active=1, max_pending=1, pending_timeout=0.001)
    gate = Gate()
    first = asyncio.ensure_future(bulkhead(request(), gate))
    await settle()
    with pytest.raises(Overflow) as caught:
        await bulkhead(request(), gate)
    assert "pending timeout" in caught.value.message
    assert (bulkhead.active, bulkhead.pending, rejected(metrics)) == (1, 0, 1)
    gate.open.set()
    (await first).release()
    assert bulkhead.active == 0


async def test_slot_is_held_until_the_response_is_released() -> None:
    bulkhead, _ = make(max_active=1, max_pending=1)
    gate = Gate()
    gate.open.set()
    response = await bulkhead(request(), gate)
    assert bulkhead.active == 1  # headers are back but the body has not been streamed yet
    waiting = asyncio.ensure_future(bulkhead(request(), gate))
    await settle()
    assert (bulkhead.pending, gate.started) == (1, 1)
    response.release()
    second = await waiting
    assert (bulkhead.active, bulkhead.pending, gate.started) == (1, 0, 2)
    second.release()
    second.release()  # release callbacks run once, so a double release cannot free two slots
    assert bulkhead.active == 0


async def test_slot_is_released_when_the_attempt_fails() -> None:
    bulkhead, _ = make(max_active=1)

    async def fail(request: ProxyRequest) -> ProxyResponse:
        raise UpstreamReset("scripted")

    for _ in range(3):
        with pytest.raises(UpstreamReset):
            await bulkhead(request(), fail)
    assert bulkhead.active == 0


async def test_cancelled_active_attempt_frees_its_slot() -> None:
    bulkhead, _ = make(max_active=1, max_pending=1)
    gate = Gate()
    first = asyncio.ensure_future(bulkhead(request(), gate))
    await settle()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (bulkhead.active, bulkhead.pending) == (0, 0)


async def test_cancelled_waiter_leaves_the_queue_without_taking_a_slot() -> None:
    bulkhead, _ = make(max_active=1, max_pending=2)
    gate = Gate()
    first = asyncio.ensure_future(bulkhead(request(), gate))
    waiter = asyncio.ensure_future(bulkhead(request(), gate))
    third = asyncio.ensure_future(bulkhead(request(), gate))
    await settle()
    assert bulkhead.pending == 2
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert bulkhead.pending == 1
    gate.open.set()
    (await first).release()
    (await third).release()  # the slot skipped the cancelled waiter and went to the next one
    assert (bulkhead.active, bulkhead.pending, gate.started) == (0, 0, 2)


async def test_waiter_cancelled_after_the_slot_was_handed_over_passes_it_on() -> None:
    bulkhead, _ = make(max_active=1, max_pending=2)
    gate = Gate()
    gate.open.set()
    held = await bulkhead(request(), gate)
    waiter = asyncio.ensure_future(bulkhead(request(), gate))
    follower = asyncio.ensure_future(bulkhead(request(), gate))
    await settle()
    held.release()  # hands the slot to `waiter`, which has not run yet
    waiter.cancel()  # and is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await waiter
    (await follower).release()
    assert (bulkhead.active, bulkhead.pending) == (0, 0)


async def test_queue_is_fifo_and_new_arrivals_do_not_jump_it() -> None:
    bulkhead, _ = make(max_active=1, max_pending=3)
    order: list[int] = []
    gate = asyncio.Event()

    def call(n: int) -> Any:
        async def call_next(request: ProxyRequest) -> ProxyResponse:
            order.append(n)
            await gate.wait()
            return ProxyResponse(200, CIMultiDict())
        return call_next

    tasks = [asyncio.ensure_future(bulkhead(request(), call(n))) for n in range(4)]
    await settle()
    gate.set()
    for task in tasks:
        (await task).release()
        await settle()
    assert order == [0, 1, 2, 3]


async def test_timed_out_waiters_do_not_pile_up_in_the_queue() -> None:
    bulkhead, _ = make(max_active=1, max_pending=2, pending_timeout=0.0001)
    gate = Gate()
    first = asyncio.ensure_future(bulkhead(request(), gate))
    await settle()
    for _ in range(50):
        with pytest.raises(Overflow):
            await bulkhead(request(), gate)
    assert len(bulkhead._waiters) <= 2 * 2 + 1
    gate.open.set()
    (await first).release()
    assert (bulkhead.active, bulkhead.pending) == (0, 0)


async def test_many_concurrent_requests_leave_no_slot_behind() -> None:
    bulkhead, _ = make(max_active=3, max_pending=5)

    async def answer(request: ProxyRequest) -> ProxyResponse:
        await asyncio.sleep(0)
        return ProxyResponse(200, CIMultiDict())

    async def one() -> None:
        with contextlib.suppress(Overflow):
            (await bulkhead(request(), answer)).release()

    await asyncio.gather(*(one() for _ in range(200)))
    assert (bulkhead.active, bulkhead.pending) == (0, 0)
