"""Pickers: which endpoint serves the next attempt.

- ``p2c_ewma`` (default; linkerd2-proxy's design): two distinct endpoints at
  random, the one with the lower ``peak-EWMA RTT x (pending + 1)`` wins.
  Fast failures are charged a penalty (``ewma.FAILURE_PENALTY_S``), so a
  failing endpoint does not attract traffic by answering quickly.
- ``least_request``: the same power-of-two choice on pending requests alone.
- ``round_robin``: in turn.

Slow start: an endpoint's ``weight`` ramps from 0.1 to 1 over ``slow_start``
after it joins or returns from ejection.  P2C divides the cost by it; round
robin skips the endpoint with probability ``1 - weight``.  Pure: the random
source and the clock come in.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from proxy.upstream.endpoints.ewma import PeakEwma

__all__ = ["Pickable", "Picker", "picker"]


class Pickable(Protocol):
    pending: int
    ewma: PeakEwma

    def weight(self, now: float) -> float: ...


class Picker(Protocol):
    def pick(self, candidates: Sequence[Pickable], now: float) -> Pickable: ...


class P2CEwma:
    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    @staticmethod
    def score(endpoint: Pickable, now: float) -> float:
        return endpoint.ewma.cost(endpoint.pending, now) / endpoint.weight(now)

    def pick(self, candidates: Sequence[Pickable], now: float) -> Pickable:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        i = self._rng.randrange(n)
        j = self._rng.randrange(n - 1)
        if j >= i:
            j += 1
        a, b = candidates[i], candidates[j]
        return a if self.score(a, now) <= self.score(b, now) else b


class LeastRequest(P2CEwma):
    __slots__ = ()

    @staticmethod
    def score(endpoint: Pickable, now: float) -> float:
        return (endpoint.pending + 1) / endpoint.weight(now)


class RoundRobin:
    __slots__ = ("_next", "_rng")

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._next = 0

    def pick(self, candidates: Sequence[Pickable], now: float) -> Pickable:
        n = len(candidates)
        for _ in range(n):
            endpoint = candidates[self._next % n]
            self._next += 1
            weight = endpoint.weight(now)
            if weight >= 1.0 or self._rng.random() < weight:
                return endpoint
        return candidates[self._next % n]  # every candidate is ramping up and each was skipped: take the next


def picker(name: str, rng: random.Random) -> Picker:
    if name == "round_robin":
        return RoundRobin(rng)
    if name == "least_request":
        return LeastRequest(rng)
    return P2CEwma(rng)
