"""The latency sketch on fake time: quantiles within the bucket error, and the window forgets."""

from __future__ import annotations

import math
import random

import pytest

from proxy.clock import FakeClock
from proxy.policies.latency import LatencySketch


def test_empty_sketch_has_no_quantile() -> None:
    sketch = LatencySketch(30.0, FakeClock())
    assert sketch.count() == 0
    assert sketch.quantile(99) is None


@pytest.mark.parametrize("percentile", [50.0, 90.0, 99.0, 99.9])
def test_quantiles_are_within_two_percent_of_the_exact_ones(percentile: float) -> None:
    rng = random.Random(3)
    clock = FakeClock()
    sketch = LatencySketch(30.0, clock)
    values = [rng.lognormvariate(-4.0, 1.0) for _ in range(5000)]
    for value in values:
        sketch.add(value)
    exact = sorted(values)[math.ceil(percentile / 100 * len(values)) - 1]  # nearest rank
    estimate = sketch.quantile(percentile)
    assert estimate is not None
    assert abs(estimate - exact) / exact < 0.02


def test_tail_above_the_percentile_does_not_move_it() -> None:
    """0.5% of answers at 1 s: p99 stays in the fast part."""
    clock = FakeClock()
    sketch = LatencySketch(30.0, clock)
    for i in range(1000):
        sketch.add(1.0 if i % 200 == 0 else 0.005 + (i % 10) * 0.001)
    p99 = sketch.quantile(99)
    assert p99 is not None and p99 < 0.016


def test_samples_leave_the_window_as_time_passes() -> None:
    clock = FakeClock()
    sketch = LatencySketch(30.0, clock, slots=6)
    for _ in range(100):
        sketch.add(0.010)
    clock.advance(20.0)
    for _ in range(100):
        sketch.add(0.100)
    assert sketch.count() == 200
    clock.advance(15.0)  # the first hundred are now 35 s old, the second 15 s
    assert sketch.count() == 100
    assert sketch.quantile(50) == pytest.approx(0.100, rel=0.02)
    clock.advance(31.0)
    assert sketch.count() == 0 and sketch.quantile(50) is None


def test_the_cached_quantile_follows_a_shift_in_the_data() -> None:
    clock = FakeClock()
    sketch = LatencySketch(30.0, clock)
    for _ in range(100):
        sketch.add(0.010)
    assert sketch.quantile(99) == pytest.approx(0.010, rel=0.02)
    for _ in range(100):
        sketch.add(0.030)  # 3x slower: the cache must not hide it
    assert sketch.quantile(99) == pytest.approx(0.030, rel=0.02)


def test_zero_and_tiny_latencies_are_accepted() -> None:
    sketch = LatencySketch(1.0, FakeClock())
    sketch.add(0.0)
    sketch.add(1e-9)
    value = sketch.quantile(50)
    assert value is not None and value < 2e-6


def test_a_bad_window_is_refused() -> None:
    with pytest.raises(ValueError, match="window_s"):
        LatencySketch(0.0, FakeClock())
