"""Cheap timeouts for the hot path: many deadlines on one event-loop timer.

``asyncio.timeout`` arms and cancels a loop timer per use (a libuv timer
under uvloop), about 4 µs a time; the deadline and the attempt timeout pay it
on every request although they almost never fire.  A ``TimerWheel`` keeps
pending deadlines in millisecond buckets and arms one loop timer for the
earliest bucket that still holds one, so starting and stopping a timeout is
a dict and set operation.  Buckets emptied by ``stop`` are dropped at once;
the loop timer then fires at most once per stale bucket and re-arms.

Semantics follow ``asyncio.timeout``: on expiry the task is cancelled, and the
owner turns that ``CancelledError`` into its timeout only when no other
cancellation is pending (``Task.uncancel`` accounting).  Expiry may come up
to a millisecond late (or, like any loop timer, a hair early).

``start(..., yield_to_io=True)`` (the adaptive attempt timeout, whose values
are tens of milliseconds) cancels two loop iterations after the timer runs:
after a stall of the loop (CPU throttling) the timer and the answer that
arrived during the stall are due together, uvloop runs timers before I/O,
and the answer should win.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import sys
from typing import Any, Final

__all__ = ["Expiry", "TimerWheel"]

_RESOLUTION_S: Final = 0.001
# Bound once: a static each, rather than a module attribute looked up on every start().
if sys.version_info >= (3, 12):
    _current_task: Final = asyncio.current_task  # C code from 3.12 on
else:
    # 3.11's asyncio.current_task is a Python function returning this C dict's entry for the
    # loop: a Python frame on every start(), which is on every request (stdlib-internal, and
    # fixed for 3.11 as it only gets security fixes).
    _current_task: Final = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]
_ceil: Final = math.ceil


class Expiry:
    """One pending timeout of one task."""

    __slots__ = ("_cancelling", "_task", "_wheel", "_yield", "bucket", "expired", "handled", "stopped")

    def __init__(self, wheel: TimerWheel, task: asyncio.Task[Any], bucket: int, yield_to_io: bool = False) -> None:
        self._wheel = wheel
        self._task = task
        self._cancelling = task.cancelling()
        self._yield = yield_to_io
        self.bucket = bucket
        self.expired = False
        self.handled = False
        self.stopped = False

    def fire(self) -> None:
        if self._yield:
            self._wheel.loop.call_soon(self._wheel.loop.call_soon, self._fire_now)
        else:
            self._fire_now()

    def _fire_now(self) -> None:
        if not self.stopped and not self._task.done():
            self.expired = True
            self._task.cancel()

    def take(self) -> bool:
        """After a ``CancelledError``: True when it was this timeout's (the owner then raises its own error)."""
        if not self.expired or self.handled:
            return False
        self.handled = True
        return self._task.uncancel() <= self._cancelling

    def stop(self) -> None:
        """Leave the wheel; settle the task's cancel count if expiry raced a normal finish."""
        self.stopped = True
        self._wheel.discard(self)
        if self.expired and not self.handled:
            self.handled = True
            self._task.uncancel()


class TimerWheel:
    """Pending ``Expiry`` objects of one event loop, bucketed by millisecond.

    One per sidecar (so one per event loop), made by ``proxy.app`` and injected into
    the policies that time requests out.  It binds to the loop it is first used on;
    ``loop`` can also be given up front.
    """

    __slots__ = ("_armed", "_buckets", "_handle", "_heap", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._buckets: dict[int, set[Expiry]] = {}
        self._heap: list[int] = []
        self._armed = math.inf  # the bucket the loop timer is set for
        self._handle: asyncio.TimerHandle | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def start(self, delay_s: float, *, yield_to_io: bool = False) -> Expiry:
        """A timeout for the current task, ``delay_s`` from now (``yield_to_io``: see the module docstring)."""
        loop = self.loop
        task = _current_task(loop)
        assert task is not None, "a timeout needs a running task on the wheel's loop"
        bucket = _ceil((loop.time() + delay_s) / _RESOLUTION_S)
        expiry = Expiry(self, task, bucket, yield_to_io)
        pending = self._buckets.get(bucket)
        if pending is None:
            self._buckets[bucket] = {expiry}
            heapq.heappush(self._heap, bucket)
            if bucket < self._armed:
                self._arm(bucket)
        else:
            pending.add(expiry)
        return expiry

    def discard(self, expiry: Expiry) -> None:
        pending = self._buckets.get(expiry.bucket)
        if pending is not None:
            pending.discard(expiry)
            if not pending:
                del self._buckets[expiry.bucket]

    def _arm(self, bucket: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = float(bucket)
        self._handle = self.loop.call_at(bucket * _RESOLUTION_S, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed = math.inf
        now = self.loop.time() / _RESOLUTION_S + 0.5  # the loop may run a timer a hair before its time
        heap, buckets = self._heap, self._buckets
        while heap and heap[0] <= now:
            due = buckets.pop(heapq.heappop(heap), None)
            if due:
                for expiry in due:
                    expiry.fire()
        while heap and heap[0] not in buckets:  # buckets emptied by stop(): nothing to wake up for
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0])

    def __len__(self) -> int:
        return sum(len(pending) for pending in self._buckets.values())
