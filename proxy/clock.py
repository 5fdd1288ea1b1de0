"""Injectable time and randomness: policies never call time or random directly.

Production code passes ``SystemClock()`` and ``random.Random()``; unit tests
pass ``FakeClock`` and a seeded ``random.Random`` so every policy runs on
virtual time with no sleeping.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "Random", "SystemClock"]

Random = random.Random


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    __slots__ = ()

    # The builtin itself, not a method wrapping it: ``now()`` runs several times per request.
    now = staticmethod(time.monotonic)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """Virtual time: ``sleep`` advances the clock instantly and records the wait."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._now += max(0.0, seconds)
        await asyncio.sleep(0)
