"""Property tests: random event sequences keep the breaker and the bucket within their invariants."""

from __future__ import annotations

import itertools
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.clock import FakeClock
from proxy.config.types import CircuitBreakerConfig, FailureRateConfig, OpenDurationConfig, SlowCallConfig
from proxy.policies.breaker_state import BreakerState, CircuitBreaker
from proxy.policies.token_bucket import TokenBucket

S = BreakerState
LEGAL = {(S.CLOSED, S.OPEN), (S.OPEN, S.HALF_OPEN), (S.HALF_OPEN, S.CLOSED), (S.HALF_OPEN, S.OPEN)}

breaker_ops = st.lists(
    st.one_of(
        st.just(("acquire", 0.0)),
        st.tuples(st.just("success"), st.floats(0.0, 5.0)),
        st.tuples(st.just("failure"), st.floats(0.0, 5.0)),
        st.just(("cancel", 0.0)),
        st.tuples(st.just("advance"), st.floats(0.0, 200.0)),
    ),
    max_size=200,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=breaker_ops,
    seed=st.integers(0, 2**32),
    consecutive=st.integers(1, 5),
    probes=st.integers(1, 3),
    with_rates=st.booleans(),
)
def test_breaker_only_makes_legal_transitions(
    ops: list[tuple[str, float]], seed: int, consecutive: int, probes: int, with_rates: bool
) -> None:
    cfg = CircuitBreakerConfig(
        consecutive_failures=consecutive,
        half_open_requests=probes,
        open_duration=OpenDurationConfig(min=1.0, max=30.0),  # type: ignore[arg-type]
        failure_rate=FailureRateConfig(threshold=0.5, window=10.0, min_requests=3) if with_rates else None,  # type: ignore[arg-type]
        slow_call=SlowCallConfig(duration=2.0, rate_threshold=0.8, window=10.0, min_requests=3)  # type: ignore[arg-type]
        if with_rates
        else None,
    )
    clock = FakeClock()
    seen: list[tuple[S, S]] = []
    breaker = CircuitBreaker(cfg, clock, random.Random(seed), lambda old, new: seen.append((old, new)))
    in_flight = 0  # calls acquired and not yet reported, as a well-behaved caller would track them
    for op, value in ops:
        before = breaker.state
        if op == "acquire":
            if breaker.try_acquire():
                in_flight += 1
        elif op == "advance":
            clock.advance(value)
        elif in_flight:
            in_flight -= 1
            if op == "success":
                breaker.record_success(value)
            elif op == "failure":
                breaker.record_failure(value)
            else:
                breaker.record_cancelled()
        snap = breaker.snapshot()
        assert 0 <= int(snap["half_open_probes"]) <= probes  # type: ignore[call-overload]
        if breaker.state is S.OPEN:
            assert breaker.retry_after() <= 30.0
        else:
            assert breaker.retry_after() == 0.0
        if op == "advance":
            assert breaker.state is before  # time alone never transitions
    assert all(pair in LEGAL for pair in seen)
    for (_, new), (old, _) in itertools.pairwise(seen):
        assert new is old  # the hook saw a connected path


bucket_ops = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.floats(0.1, 3.0)),
        st.tuples(st.just("reserve"), st.floats(0.0, 1.0)),
        st.tuples(st.just("advance"), st.floats(0.0, 2.0)),
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(ops=bucket_ops, rate=st.floats(0.5, 500.0), burst=st.integers(1, 20))
def test_bucket_stays_between_debt_floor_and_burst(
    ops: list[tuple[str, float]], rate: float, burst: int
) -> None:
    max_wait = 1.0
    clock = FakeClock()
    bucket = TokenBucket(rate, burst, clock)
    for op, value in ops:
        if op == "take":
            before = bucket.tokens
            taken = bucket.try_take(value)
            if before >= value + 1e-6:
                assert taken
            elif before < value - 1e-6:
                assert not taken
        elif op == "reserve":
            wait = bucket.reserve(value)
            assert wait is None or 0.0 <= wait <= value
        else:
            clock.advance(value)
        assert bucket.tokens <= burst
        assert bucket.tokens >= -(rate * max_wait) - 1e-6
        assert bucket.reset_after() >= 0.0
