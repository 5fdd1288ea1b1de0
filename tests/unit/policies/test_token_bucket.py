"""TokenBucket refill accuracy, burst cap, queue-mode debt, and keyed LRU eviction."""

from __future__ import annotations

import math

import pytest

from proxy.argument_checks import at_least_one
from proxy.clock import FakeClock
from proxy.policies.token_bucket import KeyedTokenBuckets, TokenBucket


def test_starts_full_and_refuses_past_burst() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=5, clock=FakeClock())
    assert bucket.tokens == 5
    assert [bucket.try_take() for _ in range(6)] == [True] * 5 + [False]
    assert bucket.tokens == pytest.approx(0.0)


def test_refill_is_continuous() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=10.0, burst=10, clock=clock)
    for _ in range(10):
        bucket.try_take()
    clock.advance(0.25)
    assert bucket.tokens == pytest.approx(2.5)
    assert bucket.try_take(2.0)
    assert not bucket.try_take(1.0)


def test_refill_is_capped_at_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=100.0, burst=3, clock=clock)
    bucket.try_take()
    clock.advance(3600.0)
    assert bucket.tokens == 3
    assert sum(bucket.try_take() for _ in range(10)) == 3


@pytest.mark.parametrize("step", [0.001, 0.0037, 0.01, 0.1])
def test_refill_accuracy_over_ten_thousand_seconds(step: float) -> None:
    """A client hammering the bucket gets rate*t + burst requests through, give or take one."""
    clock = FakeClock(start=12345.678)
    rate, burst, horizon = 100.0, 20, 10_000.0
    bucket = TokenBucket(rate_per_s=rate, burst=burst, clock=clock)
    start, accepted = clock.now(), 0
    steps = int(horizon / step)
    for i in range(1, steps + 1):
        while bucket.try_take():
            accepted += 1
        clock._now = start + i * step  # absolute, so the test clock itself does not drift
    while bucket.try_take():
        accepted += 1
    assert abs(accepted - (rate * horizon + burst)) <= 1


def test_fractional_rate_refills_exactly() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=1 / 3, burst=1, clock=clock)
    accepted = 0
    for _ in range(3 * 3000):
        accepted += bucket.try_take()
        clock.advance(1.0)
    assert accepted == 3000


def test_wait_time_reports_when_tokens_arrive() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=4.0, burst=2, clock=clock)
    assert bucket.wait_time() == 0.0
    bucket.try_take(2.0)
    assert bucket.wait_time() == pytest.approx(0.25)
    assert bucket.wait_time(2.0) == pytest.approx(0.5)
    assert bucket.wait_time(3.0) == math.inf
    clock.advance(0.25)
    assert bucket.wait_time() == 0.0


def test_reset_after_is_time_until_full() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=2.0, burst=4, clock=clock)
    assert bucket.reset_after() == 0.0
    bucket.try_take(3.0)
    assert bucket.reset_after() == pytest.approx(1.5)
    clock.advance(1.0)
    assert bucket.reset_after() == pytest.approx(0.5)


def test_reserve_takes_now_and_returns_the_wait() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=10.0, burst=1, clock=clock)
    assert bucket.reserve(max_wait_s=0.5) == 0.0
    waits = [bucket.reserve(max_wait_s=0.5) for _ in range(6)]
    assert waits[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert waits[5] is None  # would wait 0.6s: refused and nothing taken
    assert bucket.tokens == pytest.approx(-5.0)
    assert bucket.tokens >= -(10.0 * 0.5) - 1e-9


def test_reservations_are_served_in_arrival_order() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate_per_s=10.0, burst=1, clock=clock)
    bucket.try_take()
    first = bucket.reserve(max_wait_s=1.0)
    assert first == pytest.approx(0.1)
    assert not bucket.try_take()  # a newcomer may not jump the queue
    clock.advance(0.1)
    assert not bucket.try_take()  # the token that arrived belongs to the waiter
    clock.advance(0.1)
    assert bucket.try_take()


def test_reserve_with_zero_wait_behaves_like_try_take() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=1, clock=FakeClock())
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) is None


def test_reserve_rejects_negative_wait() -> None:
    with pytest.raises(ValueError, match="max_wait_s"):
        TokenBucket(1.0, 1, FakeClock()).reserve(-1.0)


@pytest.mark.parametrize(
    ("rate", "burst"), [(0.0, 1), (-1.0, 1), (float("inf"), 1), (float("nan"), 1), (1.0, 0), (1.0, -3)]
)
def test_bad_arguments_fail_in_the_constructor(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, FakeClock())
    with pytest.raises(ValueError):
        KeyedTokenBuckets(rate, burst, 10, FakeClock())


def test_a_bool_is_no_count() -> None:
    # Checked where the shared argument check runs, in Python: a compiled constructor (setup.py)
    # has already turned an ``int``-typed True into 1 when it calls the check.
    with pytest.raises(ValueError, match="burst must be an integer >= 1, got True"):
        at_least_one("burst", True)


def test_keyed_buckets_are_independent() -> None:
    buckets = KeyedTokenBuckets(rate_per_s=1.0, burst=1, max_keys=10, clock=FakeClock())
    assert buckets.get("a").try_take()
    assert not buckets.get("a").try_take()
    assert buckets.get("b").try_take()
    assert buckets.get("a") is buckets.get("a")
    assert len(buckets) == 2


def test_keyed_buckets_evict_least_recently_used() -> None:
    buckets = KeyedTokenBuckets(rate_per_s=1.0, burst=1, max_keys=2, clock=FakeClock())
    a = buckets.get("a")
    buckets.get("b")
    assert buckets.get("a") is a  # touching "a" makes "b" the oldest
    buckets.get("c")
    assert len(buckets) == 2
    assert "b" not in buckets and "a" in buckets and "c" in buckets


def test_keyed_buckets_reject_bad_max_keys() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        KeyedTokenBuckets(1.0, 1, 0, FakeClock())
