"""RollingCounter / RateWindow: sliding-window sums on virtual time."""

from __future__ import annotations

import pytest

from proxy.clock import FakeClock
from proxy.policies.window import RateWindow, RollingCounter


def test_counts_within_window() -> None:
    clock = FakeClock()
    counter = RollingCounter(10.0, clock)
    for _ in range(5):
        counter.add()
        clock.advance(1.0)
    counter.add(2.5)
    assert counter.total() == 7.5


def test_events_expire_once_the_window_has_passed() -> None:
    clock = FakeClock(start=1000.0)
    counter = RollingCounter(10.0, clock)
    counter.add(3)
    clock.advance(5.0)
    counter.add(4)
    clock.advance(5.0)  # first add is now exactly window_s old
    assert counter.total() == 4
    clock.advance(5.0)
    assert counter.total() == 0


def test_event_is_counted_for_at_least_window_minus_one_bucket() -> None:
    clock = FakeClock(start=1000.5)
    counter = RollingCounter(10.0, clock, buckets=10)
    counter.add()
    clock.advance(8.99)
    assert counter.total() == 1
    clock.advance(1.0)
    assert counter.total() == 0


def test_large_clock_jump_clears_everything() -> None:
    clock = FakeClock()
    counter = RollingCounter(1.0, clock, buckets=4)
    counter.add(10)
    clock.advance(1e9)
    assert counter.total() == 0
    counter.add()
    assert counter.total() == 1


def test_clock_going_backwards_does_not_resurrect_or_lose_counts() -> None:
    clock = FakeClock()
    counter = RollingCounter(10.0, clock)
    counter.add()
    clock.advance(-3.0)
    counter.add()
    assert counter.total() == 2


def test_running_total_matches_brute_force_over_random_walk() -> None:
    import collections
    import random

    rng = random.Random(7)
    clock = FakeClock(start=0.0)
    counter = RollingCounter(5.0, clock, buckets=5)
    events: collections.deque[tuple[float, int]] = collections.deque()
    for _ in range(5000):
        clock.advance(rng.choice([0.0, 0.1, 0.7, 1.0, 3.3]))
        k = rng.randint(0, 3)
        counter.add(k)
        events.append((clock.now(), k))
        now_bucket = int(clock.now() // 1.0)
        # Time only moves on, so an event out of the window stays out: drop it rather than skip it again.
        while int(events[0][0] // 1.0) <= now_bucket - 5:
            events.popleft()
        expected = sum(n for _, n in events)
        assert counter.total() == expected


def test_clear_forgets_everything() -> None:
    clock = FakeClock()
    counter = RollingCounter(10.0, clock)
    counter.add(5)
    counter.clear()
    assert counter.total() == 0


@pytest.mark.parametrize("window", [0.0, -1.0, float("inf"), float("nan")])
def test_rejects_bad_window(window: float) -> None:
    with pytest.raises(ValueError, match="window_s"):
        RollingCounter(window, FakeClock())


@pytest.mark.parametrize("buckets", [0, -1, -10])  # (a bool: tests/unit/policies/test_token_bucket.py)
def test_rejects_bad_bucket_count(buckets: int) -> None:
    with pytest.raises(ValueError, match="buckets"):
        RollingCounter(1.0, FakeClock(), buckets=buckets)


def test_rate_window_respects_min_requests_and_threshold() -> None:
    clock = FakeClock()
    window = RateWindow(10.0, clock)
    for _ in range(4):
        window.add(True)
    assert not window.exceeds(0.5, min_requests=5)
    window.add(False)
    assert window.exceeds(0.5, min_requests=5)
    assert window.counts() == (4, 5)
    assert window.snapshot("failures") == {"failures": 4, "total": 5, "rate": 0.8}
    window.clear()
    assert window.counts() == (0, 0)
