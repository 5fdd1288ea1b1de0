"""Peak-EWMA, outlier ejection and the pickers, on fake time with a seeded random source."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.clock import FakeClock
from proxy.config.types import OutlierDetectionConfig, OutlierFailureRateConfig
from proxy.config.units import Duration
from proxy.upstream.endpoints.balancer import P2CEwma, RoundRobin, picker
from proxy.upstream.endpoints.ewma import FAILURE_PENALTY_S, PeakEwma
from proxy.upstream.endpoints.outlier import OutlierDetector


class FakeEndpoint:
    def __init__(self, clock: FakeClock, name: str, *, since: float = 0.0, ramp_s: float = 0.0) -> None:
        self.name = name
        self.pending = 0
        self.ewma = PeakEwma(clock)
        self.since = since
        self.ramp_s = ramp_s

    def weight(self, now: float) -> float:
        if self.ramp_s <= 0:
            return 1.0
        return max(0.1, min(1.0, (now - self.since) / self.ramp_s))


def test_peak_ewma_jumps_to_a_slower_sample_at_once_and_decays_towards_faster_ones() -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock, default_s=0.010)
    ewma.observe(0.500)
    assert ewma.estimate_s == pytest.approx(0.500)
    clock.advance(10.0)  # one decay period
    ewma.observe(0.010)
    assert 0.010 < ewma.estimate_s < 0.500 * 0.4
    before = ewma.estimate_s
    clock.advance(30.0)
    ewma.observe(0.010)
    assert ewma.estimate_s < before


def test_a_failure_is_charged_as_a_slow_response() -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock, default_s=0.002)
    ewma.penalise()
    assert ewma.estimate_s >= FAILURE_PENALTY_S
    assert ewma.cost(3, clock.now()) == pytest.approx(ewma.estimate_s * 4)


def test_p2c_ewma_avoids_a_fast_failing_endpoint() -> None:
    clock = FakeClock()
    endpoints = [FakeEndpoint(clock, f"e{i}") for i in range(5)]
    for endpoint in endpoints:
        endpoint.ewma.observe(0.010)
    endpoints[0].ewma.penalise()  # answers 503 in 1 ms, charged as 1 s
    choose = P2CEwma(random.Random(3))
    counts = Counter(choose.pick(endpoints, clock.now()).name for _ in range(2000))  # type: ignore[attr-defined]
    assert counts["e0"] == 0  # it always loses its pairing
    assert all(counts[f"e{i}"] > 300 for i in range(1, 5))


def test_an_unsampled_estimate_decays_so_an_idle_endpoint_is_tried_again() -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock, default_s=0.030)
    ewma.penalise()
    assert ewma.current(clock.now()) >= FAILURE_PENALTY_S
    clock.advance(60.0)  # six decay periods without a sample
    assert ewma.current(clock.now()) < 0.005


def test_p2c_ewma_prefers_the_endpoint_with_fewer_pending_at_equal_latency() -> None:
    clock = FakeClock()
    busy, idle = FakeEndpoint(clock, "busy"), FakeEndpoint(clock, "idle")
    busy.pending = 10
    choose = picker("p2c_ewma", random.Random(1))
    assert all(choose.pick([busy, idle], clock.now()) is idle for _ in range(50))


def test_least_request_picks_on_pending_alone() -> None:
    clock = FakeClock()
    slow, fast = FakeEndpoint(clock, "slow"), FakeEndpoint(clock, "fast")
    slow.ewma.observe(2.0)  # latency does not matter to least_request
    fast.pending = 1
    choose = picker("least_request", random.Random(1))
    assert all(choose.pick([slow, fast], clock.now()) is slow for _ in range(50))


def test_round_robin_takes_each_endpoint_in_turn() -> None:
    clock = FakeClock()
    endpoints = [FakeEndpoint(clock, f"e{i}") for i in range(3)]
    choose = RoundRobin(random.Random(1))
    names = [choose.pick(endpoints, clock.now()).name for _ in range(6)]  # type: ignore[attr-defined]
    assert names == ["e0", "e1", "e2", "e0", "e1", "e2"]


def test_slow_start_ramps_a_new_endpoint_up_over_its_window() -> None:
    clock = FakeClock(start=0.0)
    old = [FakeEndpoint(clock, f"old{i}") for i in range(4)]
    new = FakeEndpoint(clock, "new", since=0.0, ramp_s=30.0)
    choose = RoundRobin(random.Random(5))
    clock.advance(3.0)  # 10% into the ramp
    early = Counter(choose.pick([*old, new], clock.now()).name for _ in range(5000))  # type: ignore[attr-defined]
    clock.advance(27.0)  # ramp over
    late = Counter(choose.pick([*old, new], clock.now()).name for _ in range(5000))  # type: ignore[attr-defined]
    assert early["new"] < 0.05 * 5000
    assert late["new"] == pytest.approx(1000, rel=0.05)


def _detector(clock: FakeClock, **overrides: object) -> OutlierDetector:
    fields: dict[str, object] = {"consecutive_failures": 5, "base_ejection": Duration(30),
                                 "max_ejection": Duration(300), "max_ejected_percent": 50}
    fields.update(overrides)
    return OutlierDetector(OutlierDetectionConfig(**fields), clock)  # type: ignore[arg-type]


def test_consecutive_failures_earn_an_ejection_and_a_success_resets_the_count() -> None:
    clock = FakeClock()
    detector = _detector(clock)
    tracker = detector.tracker()
    for _ in range(4):
        assert detector.record(tracker, failure=True) is None
    assert detector.record(tracker, failure=False) is None
    for _ in range(4):
        assert detector.record(tracker, failure=True) is None
    assert detector.record(tracker, failure=True) == "consecutive_failures"


def test_failure_rate_over_the_window_earns_an_ejection() -> None:
    clock = FakeClock()
    detector = _detector(clock, consecutive_failures=1000,
                         failure_rate=OutlierFailureRateConfig(threshold=0.85, min_requests=20, window=Duration(10)))
    tracker = detector.tracker()
    reasons = []
    for i in range(40):
        reasons.append(detector.record(tracker, failure=i % 10 != 0))  # 90% failures, never 1000 in a row
    assert "failure_rate" in reasons
    assert reasons.index("failure_rate") >= 19  # not before min_requests


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    clock = FakeClock()
    detector = _detector(clock, base_ejection=Duration(30), max_ejection=Duration(100))
    tracker = detector.tracker()
    assert detector.eject(tracker) == 30
    assert tracker.ejected(clock.now())
    clock.advance(31)
    assert not tracker.ejected(clock.now())
    assert detector.eject(tracker) == 60
    clock.advance(61)
    assert detector.eject(tracker) == 90
    clock.advance(91)
    assert detector.eject(tracker) == 100  # capped
    clock.advance(1000)  # well-behaved for long: the multiplier starts over
    assert detector.eject(tracker) == 30


@pytest.mark.parametrize(("total", "ejected", "allowed"), [
    (1, 0, False),  # never the last endpoint
    (2, 0, True),  # one of two may go (Envoy's 10% would refuse under 10 hosts)
    (2, 1, False),
    (5, 2, False),  # 3/5 = 60% > 50%
    (5, 1, True),
    (10, 4, True),
    (10, 5, False),
])
def test_ejection_caps_hold_at_max_percent_and_never_eject_the_last_endpoint(total: int, ejected: int,
                                                                             allowed: bool) -> None:
    assert _detector(FakeClock()).may_eject(ejected, total) is allowed


def test_max_ejected_percent_zero_disables_ejection() -> None:
    assert not _detector(FakeClock(), max_ejected_percent=0).may_eject(0, 10)
