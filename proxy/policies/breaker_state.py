"""The circuit breaker's state machine: when to stop calling a failing upstream.

Pure and I/O-free; the ``circuit_breaker`` policy wraps it.  CLOSED counts
outcomes and trips to OPEN on ``consecutive_failures`` in a row, or on a
failure rate / slow-call rate over a sliding window (once ``min_requests`` have
been seen).  OPEN refuses calls until ``open_until``; the first
``try_acquire`` after that moves to HALF_OPEN, which lets at most
``half_open_requests`` probes out.  That many probe successes close the
breaker; one probe failure re-opens it for longer.

``try_acquire`` hands out a ticket, the number of the state period the call
was admitted in; outcomes are reported with it.  In HALF_OPEN only the
period's own probes decide: a call admitted while CLOSED that finishes during
HALF_OPEN says nothing about whether the upstream recovered.

Open duration (Linkerd failure-accrual style): the k-th consecutive opening
(k = 0 first, reset when the breaker closes) lasts
``d_k = min(max, min * 2^k)`` plus upward jitter, capped at max::

    actual = min(max, d_k * (1 + 0.5 * rng.random()))    # in [d_k, min(max, 1.5 * d_k)]

Jitter only ever lengthens, so an opening is never shorter than
``open_duration.min`` nor longer than ``open_duration.max``, and each
re-opening is at least as long as the previous one (2*d_k >= 1.5*d_k).
Breakers that tripped together drift apart, so their probes do not hit a
recovering upstream in lockstep.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable
from typing import Final

from proxy.clock import Clock
from proxy.config.types import CircuitBreakerConfig
from proxy.policies.window import RateWindow

__all__ = ["BreakerState", "CircuitBreaker"]

_JITTER: Final = 0.5


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


Transition = Callable[[BreakerState, BreakerState], None]


class CircuitBreaker:
    __slots__ = (
        "_clock", "_consecutive", "_entered_at", "_fr", "_fr_window", "_k", "_k_cap", "_on_transition",
        "_open_until", "_period", "_probe_ok", "_probes", "_rng", "_sc", "_sc_window", "_state", "cfg",
    )

    def __init__(
        self,
        cfg: CircuitBreakerConfig,
        clock: Clock,
        rng: random.Random,
        on_transition: Transition | None = None,
    ) -> None:
        # msgspec checks these when decoding YAML, but not when a struct is built in code.
        if cfg.consecutive_failures < 1:
            raise ValueError(f"consecutive_failures must be >= 1, got {cfg.consecutive_failures!r}")
        if cfg.half_open_requests < 1:
            raise ValueError(f"half_open_requests must be >= 1, got {cfg.half_open_requests!r}")
        lo, hi = cfg.open_duration.min, cfg.open_duration.max
        if not (math.isfinite(hi) and 0 < lo <= hi):
            raise ValueError(f"open_duration needs 0 < min <= max (finite), got min={lo!r} max={hi!r}")
        self.cfg = cfg
        self._clock = clock
        self._rng = rng
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._period = 1  # numbers the state periods; tickets carry it (never 0, so a ticket is truthy)
        self._entered_at = clock.now()
        self._open_until = 0.0
        self._consecutive = 0
        self._k = 0  # openings since the breaker last closed
        # Past this exponent min*2^k >= max, so clamping keeps ldexp finite however often it re-opens.
        self._k_cap = math.ceil(math.log2(hi / lo)) + 1
        self._probes = 0  # half-open probes acquired and not yet finished
        self._probe_ok = 0  # half-open probes that succeeded in this half-open period
        self._fr = cfg.failure_rate
        self._sc = cfg.slow_call
        self._fr_window = RateWindow(self._fr.window, clock) if self._fr else None
        self._sc_window = RateWindow(self._sc.window, clock) if self._sc else None

    # --- reads ---

    @property
    def state(self) -> BreakerState:
        """The current state; reading it never transitions (OPEN stays OPEN past open_until)."""
        return self._state

    @property
    def entered_at(self) -> float:
        return self._entered_at

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    @property
    def open_until(self) -> float:
        return self._open_until

    def retry_after(self) -> float:
        """Seconds until the OPEN period ends (0.0 when not open or already due)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        left = self._open_until - self._clock.now()
        return left if left > 0.0 else 0.0

    def open_duration(self, k: int) -> tuple[float, float]:
        """Bounds ``(low, high)`` of the k-th consecutive opening, for docs, tests and /status."""
        d = min(self.cfg.open_duration.max, math.ldexp(self.cfg.open_duration.min, min(k, self._k_cap)))
        return d, min(self.cfg.open_duration.max, d * (1.0 + _JITTER))

    def snapshot(self) -> dict[str, object]:
        snap: dict[str, object] = {
            "state": self._state.value,
            "entered_at": self._entered_at,
            "open_until": self._open_until if self._state is BreakerState.OPEN else None,
            "retry_after": self.retry_after(),
            "consecutive_failures": self._consecutive,
            "openings": self._k,
            "half_open_probes": self._probes,
        }
        if self._fr_window is not None:
            snap["failure_rate"] = self._fr_window.snapshot("failures")
        if self._sc_window is not None:
            snap["slow_call"] = self._sc_window.snapshot("slow")
        return snap

    # --- events ---

    def would_admit(self) -> bool:
        """Whether ``try_acquire`` would admit a call now (changes nothing)."""
        state = self._state
        if state is BreakerState.OPEN:
            return self._clock.now() >= self._open_until
        return state is BreakerState.CLOSED or self._probes < self.cfg.half_open_requests

    def try_acquire(self) -> int | None:
        """Ask permission for one call: None, or a ticket to report exactly one outcome with."""
        state = self._state
        if state is BreakerState.CLOSED:
            return self._period
        if state is BreakerState.OPEN:
            if self._clock.now() < self._open_until:
                return None
            self._enter(BreakerState.HALF_OPEN)
        if self._probes < self.cfg.half_open_requests:
            self._probes += 1
            return self._period
        return None

    def _is_probe(self, ticket: int | None) -> bool:
        """In HALF_OPEN: the call is one of this period's probes (None: the caller keeps no ticket)."""
        return self._probes > 0 and (ticket is None or ticket == self._period)

    def record_success(self, duration_s: float, ticket: int | None = None) -> None:
        """An acquired call finished OK (the caller decides what OK means; 4xx usually is)."""
        state = self._state
        if state is BreakerState.CLOSED:
            self._consecutive = 0
            self._feed(duration_s, failed=False)
            if self._slow_rate_tripped():
                self._trip()
        elif state is BreakerState.HALF_OPEN and self._is_probe(ticket):
            # Not a probe: a call admitted before the trip; it says nothing about recovery.
            self._probes -= 1
            self._probe_ok += 1
            if self._probe_ok >= self.cfg.half_open_requests:
                self._close()
        # OPEN: a call admitted before the trip finished late; it says nothing new.

    def record_failure(self, duration_s: float, ticket: int | None = None) -> None:
        """An acquired call failed (by the caller's definition: 5xx, reset, timeout...)."""
        state = self._state
        if state is BreakerState.CLOSED:
            self._consecutive += 1
            self._feed(duration_s, failed=True)
            if (
                self._consecutive >= self.cfg.consecutive_failures
                or self._failure_rate_tripped()
                or self._slow_rate_tripped()
            ):
                self._trip()
        elif state is BreakerState.HALF_OPEN and self._is_probe(ticket):
            self._probes -= 1
            self._consecutive += 1
            self._trip()

    def record_cancelled(self, ticket: int | None = None) -> None:
        """An acquired call ended with no verdict (client went away): free its probe slot."""
        if self._state is BreakerState.HALF_OPEN and self._is_probe(ticket):
            self._probes -= 1

    # --- internals ---

    def _feed(self, duration_s: float, failed: bool) -> None:
        if self._fr_window is not None:
            self._fr_window.add(failed)
        if self._sc is not None and self._sc_window is not None:
            # Slow counts whatever the verdict, as in Resilience4j: a slow failure is still slow.
            self._sc_window.add(duration_s >= self._sc.duration)

    def _failure_rate_tripped(self) -> bool:
        fr, window = self._fr, self._fr_window
        return fr is not None and window is not None and window.exceeds(fr.threshold, fr.min_requests)

    def _slow_rate_tripped(self) -> bool:
        sc, window = self._sc, self._sc_window
        return sc is not None and window is not None and window.exceeds(sc.rate_threshold, sc.min_requests)

    def _trip(self) -> None:
        low, _ = self.open_duration(self._k)
        duration = min(self.cfg.open_duration.max, low * (1.0 + _JITTER * self._rng.random()))
        self._k += 1
        self._open_until = self._clock.now() + duration
        self._enter(BreakerState.OPEN)

    def _close(self) -> None:
        self._consecutive = 0
        self._k = 0
        for window in (self._fr_window, self._sc_window):
            if window is not None:
                window.clear()
        self._enter(BreakerState.CLOSED)

    def _enter(self, new: BreakerState) -> None:
        old = self._state
        self._state = new
        self._period += 1
        self._entered_at = self._clock.now()
        self._probes = 0
        self._probe_ok = 0
        if self._on_transition is not None:
            self._on_transition(old, new)
