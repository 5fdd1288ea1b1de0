"""RetryBudget arithmetic: ratio of recent requests plus a per-second floor."""

from __future__ import annotations

import pytest

from proxy.clock import FakeClock
from proxy.config.types import BudgetConfig
from proxy.policies.budget import RetryBudget


def drain(budget: RetryBudget, limit: int = 10_000) -> int:
    allowed = 0
    while allowed < limit and budget.try_withdraw():
        allowed += 1
    return allowed


def test_ratio_of_requests_allows_exactly_that_many_retries() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window_s=10.0, clock=FakeClock())
    for _ in range(100):
        budget.record_request()
    assert budget.remaining() == 20
    assert drain(budget) == 20
    assert budget.remaining() == 0


def test_floor_allows_retries_with_no_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=10.0, window_s=10.0, clock=FakeClock())
    assert budget.remaining() == 100
    assert drain(budget) == 100


def test_ratio_and_floor_add_up() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=1.0, window_s=10.0, clock=FakeClock())
    for _ in range(10):
        budget.record_request()
    assert drain(budget) == 15


def test_float_rounding_does_not_cost_the_last_retry() -> None:
    budget = RetryBudget(ratio=0.57, min_per_second=0.0, window_s=10.0, clock=FakeClock())
    for _ in range(100):
        budget.record_request()
    assert drain(budget) == 57


def test_zero_budget_refuses_every_retry() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, window_s=10.0, clock=FakeClock())
    budget.record_request()
    assert not budget.try_withdraw()
    assert budget.remaining() == 0


def test_spent_budget_recovers_after_the_window_slides() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window_s=10.0, clock=clock)
    for _ in range(100):
        budget.record_request()
    assert drain(budget) == 20
    clock.advance(10.0)
    assert budget.remaining() == 0  # the requests that earned the allowance expired too
    for _ in range(50):
        budget.record_request()
    assert drain(budget) == 10


def test_retries_expire_with_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window_s=10.0, clock=clock)
    assert drain(budget) == 10
    clock.advance(5.0)
    assert not budget.try_withdraw()
    clock.advance(5.0)
    assert drain(budget) == 10


def test_from_config_uses_every_field() -> None:
    cfg = BudgetConfig(ratio=0.1, min_per_second=2.0, window=5.0)  # type: ignore[arg-type]
    budget = RetryBudget.from_config(cfg, FakeClock())
    assert (budget.ratio, budget.min_per_second, budget.window_s) == (0.1, 2.0, 5.0)
    assert budget.remaining() == 10


@pytest.mark.parametrize(
    ("ratio", "floor", "window"),
    [
        (-0.1, 1.0, 10.0),
        (float("nan"), 1.0, 10.0),
        (0.2, -1.0, 10.0),
        (0.2, 1.0, 0.0),
        (0.2, 1.0, float("inf")),
    ],
)
def test_bad_arguments_fail_in_the_constructor(ratio: float, floor: float, window: float) -> None:
    with pytest.raises(ValueError):
        RetryBudget(ratio, floor, window, FakeClock())
