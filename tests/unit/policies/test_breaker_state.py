"""CircuitBreaker: every transition, growing open durations, probes and rate-based tripping."""

from __future__ import annotations

import random

import pytest

from proxy.clock import FakeClock
from proxy.config.types import (
    CircuitBreakerConfig,
    FailureRateConfig,
    OpenDurationConfig,
    SlowCallConfig,
)
from proxy.policies.breaker_state import BreakerState, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make(
    clock: FakeClock | None = None, seed: int = 1, **overrides: object
) -> tuple[CircuitBreaker, FakeClock, list[tuple[BreakerState, BreakerState]]]:
    fields: dict[str, object] = {
        "consecutive_failures": 3,
        "open_duration": OpenDurationConfig(min=1.0, max=10.0),  # type: ignore[arg-type]
    }
    fields.update(overrides)
    cfg = CircuitBreakerConfig(**fields)  # type: ignore[arg-type]
    clock = clock or FakeClock()
    transitions: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(cfg, clock, random.Random(seed), lambda old, new: transitions.append((old, new)))
    return breaker, clock, transitions


def fail(breaker: CircuitBreaker, times: int, duration: float = 0.01) -> None:
    for _ in range(times):
        assert breaker.try_acquire()
        breaker.record_failure(duration)


def succeed(breaker: CircuitBreaker, times: int, duration: float = 0.01) -> None:
    for _ in range(times):
        assert breaker.try_acquire()
        breaker.record_success(duration)


def reach_half_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    clock.advance(breaker.retry_after())
    assert breaker.try_acquire()
    assert breaker.state is HALF_OPEN


def test_starts_closed_and_admits_calls() -> None:
    breaker, clock, transitions = make()
    assert breaker.state is CLOSED
    assert breaker.entered_at == clock.now()
    assert breaker.try_acquire()
    assert breaker.retry_after() == 0.0
    assert transitions == []


def test_consecutive_failures_trip_to_open() -> None:
    breaker, clock, transitions = make()
    fail(breaker, 2)
    assert breaker.state is CLOSED
    assert breaker.consecutive_failures == 2
    clock.advance(0.5)
    fail(breaker, 1)
    assert breaker.state is OPEN
    assert breaker.entered_at == clock.now()
    assert transitions == [(CLOSED, OPEN)]


def test_success_resets_the_consecutive_count() -> None:
    breaker, _, _ = make()
    fail(breaker, 2)
    succeed(breaker, 1)
    assert breaker.consecutive_failures == 0
    fail(breaker, 2)
    assert breaker.state is CLOSED


def test_open_refuses_until_open_until_then_goes_half_open() -> None:
    breaker, clock, transitions = make()
    fail(breaker, 3)
    wait = breaker.retry_after()
    assert 1.0 <= wait <= 1.5
    clock.advance(wait - 0.001)
    assert not breaker.try_acquire()
    assert breaker.state is OPEN
    clock.advance(0.001)
    assert breaker.retry_after() == 0.0
    assert breaker.state is OPEN  # reading state never transitions
    assert breaker.try_acquire()
    assert breaker.state is HALF_OPEN
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


def test_half_open_success_closes_and_resets() -> None:
    breaker, clock, transitions = make()
    fail(breaker, 3)
    reach_half_open(breaker, clock)
    breaker.record_success(0.01)
    assert breaker.state is CLOSED
    assert breaker.consecutive_failures == 0
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    fail(breaker, 3)  # the re-open counter was reset: back to the shortest duration
    assert 1.0 <= breaker.retry_after() <= 1.5


def test_half_open_failure_reopens_with_longer_duration() -> None:
    breaker, clock, transitions = make()
    fail(breaker, 3)
    first = breaker.retry_after()
    reach_half_open(breaker, clock)
    breaker.record_failure(0.01)
    assert breaker.state is OPEN
    second = breaker.retry_after()
    assert second > first
    assert 2.0 <= second <= 3.0
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)]


def test_open_duration_doubles_per_reopening_and_is_capped_at_max() -> None:
    breaker, clock, _ = make(seed=3)
    fail(breaker, 3)
    durations = [breaker.retry_after()]
    for _ in range(8):
        reach_half_open(breaker, clock)
        breaker.record_failure(0.01)
        durations.append(breaker.retry_after())
    for k, duration in enumerate(durations):
        low = min(10.0, 2.0**k)
        assert low <= duration <= min(10.0, 1.5 * low)
    assert durations == sorted(durations)
    assert durations[-1] == 10.0


def test_open_duration_jitter_spans_its_bounds() -> None:
    samples = []
    for seed in range(300):
        breaker, _, _ = make(seed=seed)
        fail(breaker, 3)
        samples.append(breaker.retry_after())
    assert min(samples) >= 1.0 and max(samples) <= 1.5
    assert min(samples) < 1.05 and max(samples) > 1.45
    assert len(set(samples)) > 250  # jittered, so breakers that trip together drift apart


def test_open_duration_bounds_helper() -> None:
    breaker, _, _ = make()
    assert breaker.open_duration(0) == (1.0, 1.5)
    assert breaker.open_duration(3) == (8.0, 10.0)
    assert breaker.open_duration(10**9) == (10.0, 10.0)


def test_half_open_limits_outstanding_probes() -> None:
    breaker, clock, _ = make(half_open_requests=2)
    fail(breaker, 3)
    reach_half_open(breaker, clock)
    assert breaker.try_acquire()
    assert not breaker.try_acquire()
    assert breaker.snapshot()["half_open_probes"] == 2


def test_half_open_needs_all_probes_to_succeed_before_closing() -> None:
    breaker, clock, _ = make(half_open_requests=2)
    fail(breaker, 3)
    reach_half_open(breaker, clock)
    breaker.record_success(0.01)
    assert breaker.state is HALF_OPEN
    assert breaker.try_acquire()  # the finished probe freed its slot
    breaker.record_success(0.01)
    assert breaker.state is CLOSED


def test_cancelled_probe_frees_its_slot_without_a_verdict() -> None:
    breaker, clock, transitions = make()
    fail(breaker, 3)
    reach_half_open(breaker, clock)
    assert not breaker.try_acquire()
    breaker.record_cancelled()
    assert breaker.state is HALF_OPEN
    assert breaker.try_acquire()
    assert transitions[-1] == (OPEN, HALF_OPEN)


def test_cancelled_call_when_closed_changes_nothing() -> None:
    breaker, _, _ = make()
    fail(breaker, 2)
    assert breaker.try_acquire()
    breaker.record_cancelled()
    assert breaker.consecutive_failures == 2
    assert breaker.state is CLOSED


def test_late_outcomes_while_open_are_ignored() -> None:
    breaker, _, transitions = make()
    assert breaker.try_acquire()  # a slow call admitted before the trip
    fail(breaker, 3)
    breaker.record_success(0.01)
    breaker.record_failure(0.01)
    assert breaker.state is OPEN
    assert transitions == [(CLOSED, OPEN)]


def test_failure_rate_trips_once_min_requests_are_seen() -> None:
    rate = FailureRateConfig(threshold=0.5, window=10.0, min_requests=10)  # type: ignore[arg-type]
    breaker, _, _ = make(consecutive_failures=100, failure_rate=rate)
    for _ in range(4):
        fail(breaker, 1)
        succeed(breaker, 1)
    fail(breaker, 1)
    assert breaker.state is CLOSED  # 5 of 9: rate is high but min_requests not reached
    succeed(breaker, 1)
    assert breaker.state is CLOSED  # successes never trip on failure rate
    fail(breaker, 1)
    assert breaker.state is OPEN  # 6 of 11


def test_failure_rate_below_threshold_stays_closed() -> None:
    rate = FailureRateConfig(threshold=0.5, window=10.0, min_requests=10)  # type: ignore[arg-type]
    breaker, _, _ = make(consecutive_failures=100, failure_rate=rate)
    for _ in range(50):
        fail(breaker, 1)
        succeed(breaker, 2)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["failure_rate"] == {"failures": 50, "total": 150, "rate": 50 / 150}


def test_failure_rate_forgets_failures_outside_its_window() -> None:
    rate = FailureRateConfig(threshold=0.5, window=10.0, min_requests=4)  # type: ignore[arg-type]
    breaker, clock, _ = make(consecutive_failures=100, failure_rate=rate)
    fail(breaker, 1)
    succeed(breaker, 1)
    fail(breaker, 1)
    clock.advance(11.0)
    succeed(breaker, 3)
    fail(breaker, 1)
    assert breaker.state is CLOSED


def test_slow_successes_trip_the_slow_call_rate() -> None:
    slow = SlowCallConfig(duration=1.0, rate_threshold=0.5, window=10.0, min_requests=4)  # type: ignore[arg-type]
    breaker, _, transitions = make(slow_call=slow)
    succeed(breaker, 2, duration=0.1)
    succeed(breaker, 1, duration=2.0)
    assert breaker.state is CLOSED
    succeed(breaker, 1, duration=1.0)  # exactly the threshold counts as slow
    assert breaker.state is OPEN
    assert transitions == [(CLOSED, OPEN)]


def test_slow_call_rate_respects_min_requests() -> None:
    slow = SlowCallConfig(duration=1.0, rate_threshold=0.5, window=10.0, min_requests=5)  # type: ignore[arg-type]
    breaker, _, _ = make(slow_call=slow)
    succeed(breaker, 4, duration=5.0)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["slow_call"] == {"slow": 4, "total": 4, "rate": 1.0}
    succeed(breaker, 1, duration=0.1)
    assert breaker.state is OPEN


def test_slow_failures_count_as_slow_calls() -> None:
    slow = SlowCallConfig(duration=1.0, rate_threshold=1.0, window=10.0, min_requests=2)  # type: ignore[arg-type]
    breaker, _, _ = make(consecutive_failures=100, slow_call=slow)
    fail(breaker, 1, duration=3.0)
    succeed(breaker, 1, duration=3.0)
    assert breaker.state is OPEN


def test_closing_clears_the_rate_windows() -> None:
    rate = FailureRateConfig(threshold=0.5, window=10.0, min_requests=4)  # type: ignore[arg-type]
    breaker, clock, _ = make(consecutive_failures=3, failure_rate=rate)
    succeed(breaker, 1)
    fail(breaker, 3)
    reach_half_open(breaker, clock)
    breaker.record_success(0.01)
    assert breaker.snapshot()["failure_rate"] == {"failures": 0, "total": 0, "rate": 0.0}
    fail(breaker, 1)
    succeed(breaker, 1)
    fail(breaker, 1)
    assert breaker.state is CLOSED


def test_snapshot_reports_state_for_status_page() -> None:
    breaker, clock, _ = make()
    fail(breaker, 3)
    snap = breaker.snapshot()
    assert snap["state"] == "open"
    assert snap["entered_at"] == clock.now()
    assert snap["open_until"] == breaker.open_until
    assert snap["consecutive_failures"] == 3
    assert snap["openings"] == 1
    assert "failure_rate" not in snap and "slow_call" not in snap
    clock.advance(breaker.retry_after())
    breaker.try_acquire()
    assert breaker.snapshot()["open_until"] is None


def test_works_without_a_transition_hook() -> None:
    cfg = CircuitBreakerConfig(consecutive_failures=1)
    breaker = CircuitBreaker(cfg, FakeClock(), random.Random(0))
    fail(breaker, 1)
    assert breaker.state is OPEN


@pytest.mark.parametrize("field", ["consecutive_failures", "half_open_requests"])
def test_bad_config_built_in_code_is_rejected(field: str) -> None:
    """msgspec only validates when decoding YAML, so the breaker checks structs built in code."""
    cfg = CircuitBreakerConfig(**{field: 0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        CircuitBreaker(cfg, FakeClock(), random.Random(0))
