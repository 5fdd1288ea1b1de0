"""The token-lease state machine (``proxy.policies.lease``) on fake time: spend, low water, expiry, pacing."""

from __future__ import annotations

import pytest

from proxy.clock import FakeClock
from proxy.policies.lease import Grant, LeaseState


def warm(rate: float = 100.0, demand_per_s: float = 100.0, seconds: float = 2.0) -> tuple[LeaseState, FakeClock]:
    """A lease whose demand estimate has converged to ``demand_per_s`` (every request granted)."""
    clock = FakeClock()
    lease = LeaseState(rate, clock)
    step = 1.0 / demand_per_s
    for _ in range(int(seconds * demand_per_s)):
        clock.advance(step)
        if not lease.try_take():
            asked = lease.refill_size(empty_only=True)
            lease.start()
            lease.on_grant(asked, Grant(asked, 0.0, 0.1))
            assert lease.try_take()
        if (asked := lease.refill_size()) > 0:
            lease.start()
            lease.on_grant(asked, Grant(asked, 0.0, 0.1))
    return lease, clock


def test_a_cold_lease_has_no_tokens_and_asks_for_one() -> None:
    lease = LeaseState(100.0, FakeClock())
    assert not lease.try_take()
    assert lease.refill_size(empty_only=True) == 1


def test_granted_tokens_are_spent_one_per_request_and_no_more() -> None:
    lease = LeaseState(100.0, FakeClock())
    lease.start()
    lease.on_grant(3, Grant(3, 0.0, 0.03))
    assert [lease.try_take() for _ in range(4)] == [True, True, True, False]
    assert lease.balance == 0


def test_unused_lease_tokens_expire() -> None:
    clock = FakeClock()
    lease = LeaseState(100.0, clock, lease_ttl_s=0.5)
    lease.start()
    lease.on_grant(5, Grant(5, 0.0, 0.05))
    clock.advance(0.49)
    assert lease.try_take()
    clock.advance(0.02)
    assert not lease.try_take()
    assert lease.balance == 0


def test_lease_size_follows_demand_and_is_capped_at_the_horizon_share_of_the_rate() -> None:
    lease, _ = warm(rate=1000.0, demand_per_s=200.0)
    assert lease.rate_estimate == pytest.approx(200.0, rel=0.1)
    assert lease._lease_size() == pytest.approx(20, abs=2)  # 100 ms of this sidecar's demand
    greedy, _ = warm(rate=100.0, demand_per_s=2000.0)
    assert greedy._lease_size() == 10  # never more than 100 ms of the whole limit


def test_a_refill_starts_at_the_low_water_mark_before_the_balance_is_empty() -> None:
    lease, _ = warm(rate=1000.0, demand_per_s=200.0)
    while lease.balance >= lease.low_water():
        assert lease.try_take()
    assert lease.balance > 0
    assert lease.refill_size() > 0  # asked while tokens are still there: requests do not wait


def test_only_one_lease_request_is_in_flight() -> None:
    lease = LeaseState(100.0, FakeClock())
    assert lease.refill_size(empty_only=True) == 1
    lease.start()
    assert lease.refill_size(empty_only=True) == 0
    lease.on_error()
    assert lease.refill_size(empty_only=True) == 1


def test_a_short_grant_paces_the_next_request_and_tells_when_to_retry() -> None:
    clock = FakeClock()
    lease = LeaseState(100.0, clock, horizon_s=0.1)
    lease.start()
    lease.on_grant(5, Grant(0, 0.03, 0.2))
    assert lease.retry_after() == pytest.approx(0.1)  # at least the horizon, however soon a token is due
    assert lease.refill_size(empty_only=True) == 0
    clock.advance(0.1)
    assert lease.retry_after() == 0.0
    assert lease.refill_size(empty_only=True) >= 1


def test_a_long_gcra_wait_is_kept_as_the_retry_after() -> None:
    clock = FakeClock()
    lease = LeaseState(1.0, clock, horizon_s=0.1)
    lease.start()
    lease.on_grant(1, Grant(0, 0.7, 1.0))
    assert lease.retry_after() == pytest.approx(0.7)
    assert lease.full_after() == pytest.approx(1.0)


def test_a_full_grant_clears_pacing() -> None:
    clock = FakeClock()
    lease = LeaseState(100.0, clock)
    lease.start()
    lease.on_grant(2, Grant(1, 0.01, 0.1))
    clock.advance(0.2)
    lease.start()
    lease.on_grant(2, Grant(2, 0.0, 0.1))
    assert lease.retry_after() == 0.0


def test_waiting_requests_enlarge_the_next_lease() -> None:
    lease = LeaseState(1000.0, FakeClock())
    lease.waiting = 7
    assert lease.refill_size(empty_only=True) == 7


def test_drop_forgets_every_lease() -> None:
    lease = LeaseState(100.0, FakeClock())
    lease.start()
    lease.on_grant(4, Grant(4, 0.0, 0.04))
    lease.drop()
    assert lease.balance == 0 and not lease.try_take()


def test_invalid_parameters_fail_in_the_constructor() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        LeaseState(0.0, FakeClock())
    with pytest.raises(ValueError, match="horizon_s"):
        LeaseState(10.0, FakeClock(), horizon_s=1.0, lease_ttl_s=0.5)


def test_pace_is_shortened_so_the_shared_bucket_never_overflows_between_calls() -> None:
    clock = FakeClock()
    lease = LeaseState(200.0, clock, burst=10, horizon_s=0.1)  # the bucket fills in 50 ms
    lease.start()
    lease.on_grant(5, Grant(2, 0.0, 0.05))
    assert lease.saturated
    assert lease.retry_after() == pytest.approx(0.025)  # half the fill time
    tiny = LeaseState(1000.0, clock, burst=1)
    tiny.start()
    tiny.on_grant(2, Grant(1, 0.0, 0.001))
    assert tiny.retry_after() == pytest.approx(0.01)  # but never under 10 ms


def test_a_full_grant_ends_saturation() -> None:
    lease = LeaseState(100.0, FakeClock())
    lease.start()
    lease.on_grant(3, Grant(1, 0.0, 0.1))
    assert lease.saturated
    lease.start()
    lease.on_grant(3, Grant(3, 0.0, 0.1))
    assert not lease.saturated


def test_a_whole_grant_that_empties_the_shared_bucket_counts_as_saturated() -> None:
    lease = LeaseState(100.0, FakeClock(), burst=20)
    lease.start()
    lease.on_grant(5, Grant(5, 0.0, 0.18))  # 18 of 20 tokens' worth now taken: 2 left, less than a lease
    assert lease.saturated and lease.retry_after() == 0.0  # no pacing: the grant was not short
    lease.start()
    lease.on_grant(5, Grant(5, 0.0, 0.05))  # 15 left
    assert not lease.saturated
