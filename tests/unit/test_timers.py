"""The timer wheel behind the deadline and attempt timeouts: expiry, stop, and foreign cancellation.

Real event-loop time, waits of a few milliseconds.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.timers import TimerWheel


async def test_expiry_cancels_the_task_and_is_taken_as_the_timeout() -> None:
    wheel = TimerWheel(asyncio.get_running_loop())
    timer = wheel.start(0.01)
    started = asyncio.get_running_loop().time()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(5)
    assert timer.take()
    timer.stop()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    assert 0.009 <= asyncio.get_running_loop().time() - started < 1.0


async def test_stopped_timer_never_fires_and_leaves_the_wheel_empty() -> None:
    wheel = TimerWheel(asyncio.get_running_loop())
    timers = [wheel.start(0.01) for _ in range(5)]
    for timer in timers:
        timer.stop()
    assert len(wheel) == 0
    await asyncio.sleep(0.03)  # would be cancelled here if any had fired
    assert not any(timer.expired for timer in timers)


async def test_earlier_timer_started_later_fires_first() -> None:
    wheel = TimerWheel(asyncio.get_running_loop())
    late = wheel.start(5.0)
    early = wheel.start(0.01)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(5)
    assert early.take() and not late.take()
    early.stop()
    late.stop()


async def test_a_cancellation_that_is_not_the_timers_is_not_taken_as_a_timeout() -> None:
    """The app leaves just as the timer is due: the cancellation stays a cancellation."""
    loop = asyncio.get_running_loop()

    async def body() -> bool:
        timer = TimerWheel(loop).start(0.001)
        time.sleep(0.005)  # noqa: ASYNC251 (blocking on purpose: the timer is due at the next loop iteration)
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # someone else's cancellation, before the timer's
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            taken = timer.take()
            timer.stop()
            return taken
        return True

    assert await loop.create_task(body()) is False


async def test_an_answer_due_with_a_late_timer_wins_when_the_timer_yields_to_io() -> None:
    """A stalled loop (CPU throttling) makes the answer and the timer due together: the answer wins.

    (Without ``yield_to_io`` the outcome depends on the loop's order of timers and I/O: not asserted.)"""
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop)
    answer: asyncio.Future[str] = loop.create_future()
    timer = wheel.start(0.01, yield_to_io=True)
    loop.call_later(0.002, time.sleep, 0.05)  # the loop stalls past both
    loop.call_later(0.005, answer.set_result, "head")
    try:
        result = await answer
    except asyncio.CancelledError:
        result = "timed out"
        assert timer.take()
    timer.stop()
    assert result == "head"
    assert not timer.expired
