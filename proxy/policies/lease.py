"""Token leasing: the local side of a global rate limit, as a pure state machine on an injected clock.

A sidecar with ``scope: global`` admits a request only by spending a token it
was *granted* by the Redis-side GCRA (``proxy.store.gcra``).  Tokens come in
leases: a batch of ``n`` tokens that expires ``lease_ttl_s`` after it was
granted, so a sidecar that goes quiet cannot hoard part of the fleet's rate.
Because every admitted request spends a granted token, the fleet never
admits more than the GCRA grants, whatever the number of replicas.

The request path does not wait on Redis while leases are warm: once the
balance falls to the low-water mark (half a lease) ``refill_size`` asks the
caller to fetch the next lease in the background.  A request only waits when
the balance is empty (a cold start, or demand outgrew the lease size).

Lease size follows demand: ``ceil(rate_estimate * horizon_s)`` tokens, at
least 1 and at most ``ceil(rate_per_s * horizon_s)`` (100 ms of the global
rate by default), where the estimate is an EWMA of the requests that asked
for a token.  After a short grant the limit is *saturated* (the shared bucket
is empty, or the grant left less than another lease in it): after a short
grant the next refill waits ``max(retry_after, pace)``, and requests that
find no token are refused at once, never held for a round trip that could
only move a token from one request to another.  ``pace`` is ``horizon_s``,
shortened to half the time the shared bucket takes to fill (``burst /
rate``) so that the fleet keeps draining it and no token overflows unused,
but never under 10 ms: Redis calls per sidecar stay at most 100 per second.

This module does no I/O: ``GlobalRateLimit`` runs the calls it asks for.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

from proxy.argument_checks import finite_positive
from proxy.clock import Clock

__all__ = ["Grant", "LeaseState"]

_TAU_S = 0.5  # time constant of the demand estimate: follows a load change within about a second
_MIN_SAMPLE_S = 0.01  # the estimate is updated at most this often (a rate over less is too noisy)
_MIN_PACE_S = 0.01


class Grant(NamedTuple):
    """What the GCRA answered to a lease request (all durations as seen by Redis, in seconds)."""

    granted: int
    retry_after_s: float  # until one more token is free (0 when everything asked was granted)
    full_after_s: float  # until the shared bucket is full again (for RateLimit-Reset)


class LeaseState:
    __slots__ = (
        "_batches", "_burst", "_clock", "_demand", "_estimated_at", "_full_at", "_horizon_s", "_max_lease",
        "_pace_s", "_rate", "_ttl_s", "balance", "next_refill_at", "pending", "rate_estimate", "retry_at",
        "saturated", "waiting",
    )

    def __init__(self, rate_per_s: float, clock: Clock, *, burst: int = 1_000_000, horizon_s: float = 0.1,
                 lease_ttl_s: float = 0.5) -> None:
        finite_positive("rate_per_s", rate_per_s)
        if not 0 < horizon_s <= lease_ttl_s:
            raise ValueError(f"need 0 < horizon_s <= lease_ttl_s, got {horizon_s!r} and {lease_ttl_s!r}")
        self._clock = clock
        self._horizon_s = horizon_s
        self._ttl_s = lease_ttl_s
        self._max_lease = max(1, math.ceil(rate_per_s * horizon_s))
        self._pace_s = max(_MIN_PACE_S, min(horizon_s, 0.5 * burst / rate_per_s))
        self._burst, self._rate = burst, rate_per_s
        self.saturated = False  # the last grant was short: the shared bucket is empty
        self._batches: deque[list[float]] = deque()  # [expires_at, tokens left], oldest first
        self.balance = 0  # unexpired granted tokens not yet spent
        self.pending = False  # a lease request is in flight
        self.waiting = 0  # requests waiting for that lease (set by the policy): a lease covers them all
        self.next_refill_at = -math.inf  # no lease request before this (pacing after a short grant)
        self.retry_at = -math.inf  # the GCRA's earliest time for one more token (from the last short grant)
        self._full_at = -math.inf
        self.rate_estimate = 0.0  # tokens asked for per second (EWMA)
        self._demand = 0
        self._estimated_at = clock.now()

    # --- the request path ---

    def try_take(self) -> bool:
        """Spend one granted token if there is one (and count the demand either way)."""
        self._demand += 1
        if self.balance <= 0:
            return False
        now = self._clock.now()
        batches = self._batches
        while batches and batches[0][0] <= now:
            self.balance -= int(batches.popleft()[1])
        if not batches:
            self.balance = 0
            return False
        batch = batches[0]
        batch[1] -= 1
        if batch[1] <= 0:
            batches.popleft()
        self.balance -= 1
        return True

    def retry_after(self) -> float:
        """Seconds until a refused request could get a token here (0.0 if a refill may start now)."""
        wait = max(self.next_refill_at, self.retry_at) - self._clock.now()
        return wait if wait > 0.0 else 0.0

    def full_after(self) -> float:
        """Seconds until the shared bucket is full again, as of the last grant (RateLimit-Reset)."""
        left = self._full_at - self._clock.now()
        return left if left > 0.0 else 0.0

    # --- asking for leases ---

    def low_water(self) -> int:
        return max(1, math.ceil(self._lease_size() / 2))

    def refill_size(self, *, empty_only: bool = False) -> int:
        """Tokens to ask for now, or 0 when no lease request should start.

        A request starts when none is in flight, pacing allows it and the
        balance is at the low-water mark (``empty_only``: only when it is 0,
        for a request that found no token and will wait for this lease).
        """
        now = self._clock.now()
        self._estimate(now)
        if self.pending or now < self.next_refill_at:
            return 0
        if self.balance > (0 if empty_only else self.low_water() - 1):
            return 0
        return self._lease_size()

    def start(self) -> None:
        self.pending = True

    def on_grant(self, asked: int, grant: Grant) -> None:
        now = self._clock.now()
        self.pending = False
        self._full_at = now + grant.full_after_s
        if grant.granted > 0:
            self._batches.append([now + self._ttl_s, float(grant.granted)])
            self.balance += grant.granted
        short = grant.granted < asked
        # Saturated also when the grant was whole but left the shared bucket with less than another
        # lease: the next request that finds no token here would most likely wait for nothing.
        left = self._burst - grant.full_after_s * self._rate
        self.saturated = short or left < asked
        if short:
            # The shared bucket is empty: pace the next request, so that a saturated limit
            # costs each sidecar at most one Redis call per pace, not one per request.
            self.retry_at = now + grant.retry_after_s
            self.next_refill_at = now + max(grant.retry_after_s, self._pace_s)
        else:
            self.retry_at = self.next_refill_at = -math.inf

    def on_error(self) -> None:
        self.pending = False

    def drop(self) -> None:
        """Forget every lease (the store is unreachable: the fallback decides from now on)."""
        self._batches.clear()
        self.balance = 0

    # --- sizing ---

    def _lease_size(self) -> int:
        wanted = max(self.waiting, math.ceil(self.rate_estimate * self._horizon_s))
        return min(self._max_lease, max(1, wanted))

    def _estimate(self, now: float) -> None:
        elapsed = now - self._estimated_at
        if elapsed < _MIN_SAMPLE_S:
            return
        alpha = 1.0 - math.exp(-elapsed / _TAU_S)
        self.rate_estimate += alpha * (self._demand / elapsed - self.rate_estimate)
        self._demand = 0
        self._estimated_at = now
