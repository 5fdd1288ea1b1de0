"""How long the retry policy waits before each retry, and what upstream hints mean.

Backoff strategies are tenacity-style small callables: bad arguments fail in
the constructor, and ``__call__(retry_number, previous)`` returns the seconds
to wait before retry ``retry_number`` (0 for the first retry), given the
previous wait (0.0 before the first).  The formulas are the AWS architecture
blog's: exponential ``e = min(max, base*2^n)``, full jitter ``uniform(0, e)``,
equal jitter ``e/2 + uniform(0, e/2)``, decorrelated
``min(max, uniform(base, previous*3))``.

``parse_retry_after`` and ``parse_ratelimit_reset`` turn upstream headers into
a wait in seconds; the retry policy decides whether to honour them.
"""

from __future__ import annotations

import math
import random
import re
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Protocol

from proxy.argument_checks import finite_non_negative
from proxy.config.types import BackoffConfig

__all__ = [
    "Backoff", "DecorrelatedJitter", "EqualJitter", "FullJitter", "NoJitter",
    "backoff_from_config", "parse_ratelimit_reset", "parse_retry_after",
]


class Backoff(Protocol):
    def __call__(self, retry_number: int, previous: float) -> float: ...


class _Exponential:
    """Shared ``min(max, base*2^n)`` with the exponent capped so large ``n`` never overflows."""

    __slots__ = ("_cap_exp", "base", "max")

    def __init__(self, base: float, max: float) -> None:
        finite_non_negative("base", base)
        if not (math.isfinite(max) and max >= base):
            raise ValueError(f"max must be a finite number >= base ({base!r}), got {max!r}")
        self.base = float(base)
        self.max = float(max)
        # Smallest exponent at which base*2^k already reaches max; beyond it the answer is max,
        # so clamping there keeps ldexp finite for any retry_number without changing results.
        cap = 0
        if self.base > 0 and self.max > self.base:
            # (``max`` is the parameter here, so no builtin max(); the difference is > 0 anyway.)
            cap = math.ceil(math.log2(self.max) - math.log2(self.base))
            if math.ldexp(self.base, cap) < self.max:  # log2 rounding
                cap += 1
        self._cap_exp = cap

    def _expo(self, retry_number: int) -> float:
        n = retry_number if retry_number < self._cap_exp else self._cap_exp
        return min(self.max, math.ldexp(self.base, n if n > 0 else 0))


class NoJitter(_Exponential):
    """Plain exponential backoff: ``min(max, base*2^n)``."""

    __slots__ = ()

    def __call__(self, retry_number: int, previous: float) -> float:
        return self._expo(retry_number)


class _Jittered(_Exponential):
    """An exponential backoff that draws from the injected random source."""

    __slots__ = ("_rng",)

    def __init__(self, base: float, max: float, rng: random.Random) -> None:
        super().__init__(base, max)
        self._rng = rng


class FullJitter(_Jittered):
    """``uniform(0, e)``: the best spread, so the usual default (Envoy uses it)."""

    __slots__ = ()

    def __call__(self, retry_number: int, previous: float) -> float:
        return self._rng.uniform(0.0, self._expo(retry_number))


class EqualJitter(_Jittered):
    """``e/2 + uniform(0, e/2)``: keeps at least half the exponential wait."""

    __slots__ = ()

    def __call__(self, retry_number: int, previous: float) -> float:
        half = self._expo(retry_number) / 2.0
        return half + self._rng.uniform(0.0, half)


class DecorrelatedJitter(_Jittered):
    """``min(max, uniform(base, max(base, previous*3)))``: grows from the last wait, not from n."""

    __slots__ = ()

    def __call__(self, retry_number: int, previous: float) -> float:
        # A previous wait above max (say from Retry-After) or a NaN must not overflow or poison
        # the range; clamping it into [0, max] keeps the result within [base, max].
        prev = previous if 0.0 <= previous <= self.max else (self.max if previous > self.max else 0.0)
        hi = prev * 3.0
        return min(self.max, self._rng.uniform(self.base, hi if hi > self.base else self.base))


def backoff_from_config(cfg: BackoffConfig, rng: random.Random) -> Backoff:
    if cfg.jitter == "full":
        return FullJitter(cfg.base, cfg.max, rng)
    if cfg.jitter == "equal":
        return EqualJitter(cfg.base, cfg.max, rng)
    if cfg.jitter == "decorrelated":
        return DecorrelatedJitter(cfg.base, cfg.max, rng)
    return NoJitter(cfg.base, cfg.max)


# Unsigned decimal only: "+5", "-1", "1e3", "inf" and "nan" are all rejected as garbage.
_DELTA = re.compile(r"\d+(?:\.\d+)?")
# Anything above this is a unix timestamp rather than a delta (10^9 s is 2001-09-09).
_EPOCH_THRESHOLD = 1e9


def _delta_seconds(value: str) -> float | None:
    if not _DELTA.fullmatch(value):
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) else None


def parse_retry_after(value: str, now_wall: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date), or None if invalid.

    ``now_wall`` is a ``time.time()`` value; a date in the past means "now" (0.0).
    """
    text = value.strip()
    if not text:
        return None
    seconds = _delta_seconds(text)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        # parsedate_to_datetime gives a naive datetime for "-0000"; HTTP-dates are always GMT.
        stamp = when.timestamp() if when.tzinfo is not None else when.replace(tzinfo=UTC).timestamp()
    except (OverflowError, ValueError, OSError):
        return None
    delta = stamp - now_wall
    if not math.isfinite(delta):
        return None
    return delta if delta > 0.0 else 0.0


def parse_ratelimit_reset(value: str, now_wall: float) -> float | None:
    """Seconds until an ``X-RateLimit-Reset`` / ``RateLimit-Reset`` resets, or None if invalid.

    The header is delta seconds by spec, but several APIs (GitHub among them) send a unix
    timestamp; a number above 10^9 is read as one, relative to ``now_wall`` and clamped at 0.
    """
    seconds = _delta_seconds(value.strip())
    if seconds is None:
        return None
    if seconds > _EPOCH_THRESHOLD:
        delta = seconds - now_wall
        return delta if delta > 0.0 else 0.0
    return seconds
