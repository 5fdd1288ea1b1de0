"""Token buckets for the rate-limit policy: one shared bucket, or one per client key.

The bucket is stored as a single timestamp, ``_full_at``: the clock time at
which it is (or was) full.  Tokens at time t are
``burst - max(0, _full_at - t) * rate``, and taking n tokens pushes
``_full_at`` forward by ``n / rate`` (GCRA).  Refill is therefore continuous
and exact to float precision however long the process runs: there is no
running token count to accumulate rounding from repeated small refills.

Queue mode uses debt: ``reserve`` takes the token *now* even if that drives
the balance negative and tells the caller how long to sleep.  Waiters are
then served in arrival order without a queue object, every call is O(1),
and the balance never drops below ``-(rate * max_wait)``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Final

from proxy.argument_checks import at_least_one, finite_positive
from proxy.clock import Clock

__all__ = ["KeyedTokenBuckets", "TokenBucket"]

# Float slack, in seconds, so that a token which is due "exactly now" is not refused by a rounding
# ulp of the clock value (about 1e-10 s at a monotonic clock of 10^6 s).
_EPSILON_S: Final = 1e-9


class TokenBucket:
    __slots__ = ("_clock", "_full_at", "_interval_s", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: int, clock: Clock) -> None:
        self.rate_per_s = finite_positive("rate_per_s", rate_per_s)
        self.burst = at_least_one("burst", burst)
        self._clock = clock
        self._interval_s = 1.0 / self.rate_per_s  # seconds per token, so taking one is an add
        self._full_at = clock.now()  # starts full

    def _behind(self, now: float) -> float:
        """Seconds of refill missing from a full bucket at ``now`` (debt included)."""
        behind = self._full_at - now
        return behind if behind > 0.0 else 0.0

    def _wait(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens are there; <= 0 when they already are."""
        # Compared in the time domain: tokens = burst - behind*rate, so tokens >= n exactly when
        # behind <= (burst - n) / rate.
        return self._behind(now) - (self.burst - n) * self._interval_s

    def _take(self, n: float, now: float) -> None:
        start = self._full_at if self._full_at > now else now
        self._full_at = start + n * self._interval_s

    @property
    def tokens(self) -> float:
        """Tokens available now, capped at ``burst``; negative while queued waiters hold debt."""
        return self.burst - self._behind(self._clock.now()) * self.rate_per_s

    def try_take(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens if they are all available now."""
        now = self._clock.now()
        if self._wait(n, now) > _EPSILON_S:
            return False
        self._take(n, now)
        return True

    def wait_time(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available (0.0 if now; inf if ``n`` exceeds ``burst``)."""
        if n > self.burst:
            return math.inf
        wait = self._wait(n, self._clock.now())
        return wait if wait > _EPSILON_S else 0.0

    def reserve(self, max_wait_s: float) -> float | None:
        """Queue mode: if a token is due within ``max_wait_s``, take it now and return the wait.

        The caller must sleep for the returned seconds (never more than ``max_wait_s``) before
        sending.  Returns None, taking nothing, if the wait would be longer.
        """
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s!r}")
        now = self._clock.now()
        wait = self._wait(1.0, now)
        if wait > max_wait_s + _EPSILON_S:
            return None
        self._take(1.0, now)
        if wait <= _EPSILON_S:
            return 0.0
        return wait if wait < max_wait_s else max_wait_s

    def reset_after(self) -> float:
        """Seconds until the bucket is full again (for the ``RateLimit-Reset`` header)."""
        left = self._full_at - self._clock.now()
        return left if left > 0.0 else 0.0


class KeyedTokenBuckets:
    """One bucket per key (client id, API key...), least recently used evicted past ``max_keys``.

    Eviction forgets a key's state, so an evicted client comes back with a full bucket; size
    ``max_keys`` above the number of clients active within ``burst / rate`` seconds.
    """

    __slots__ = ("_buckets", "_clock", "burst", "max_keys", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: int, max_keys: int, clock: Clock) -> None:
        at_least_one("max_keys", max_keys)
        TokenBucket(rate_per_s, burst, clock)  # validate rate and burst now, not on the first request
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def get(self, key: str) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is not None:
            self._buckets.move_to_end(key)
            return bucket
        bucket = TokenBucket(self.rate_per_s, self.burst, self._clock)
        self._buckets[key] = bucket
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets
