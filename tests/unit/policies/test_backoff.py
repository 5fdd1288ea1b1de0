"""Backoff formulas, their caps and distributions, and Retry-After / RateLimit-Reset parsing."""

from __future__ import annotations

import math
import random
import statistics
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from proxy.config.types import BackoffConfig
from proxy.policies.backoff import (
    DecorrelatedJitter,
    EqualJitter,
    FullJitter,
    NoJitter,
    backoff_from_config,
    parse_ratelimit_reset,
    parse_retry_after,
)

BASE, CAP = 0.025, 0.25


def expo(n: int) -> float:
    return min(CAP, BASE * 2.0**n)


def test_no_jitter_is_exponential_and_capped() -> None:
    backoff = NoJitter(BASE, CAP)
    assert [backoff(n, 0.0) for n in range(6)] == [0.025, 0.05, 0.1, 0.2, 0.25, 0.25]


@pytest.mark.parametrize("n", [64, 1100, 10**6, 2**62])
def test_huge_retry_numbers_do_not_overflow(n: int) -> None:
    rng = random.Random(1)
    for backoff in (NoJitter(BASE, CAP), FullJitter(BASE, CAP, rng), EqualJitter(BASE, CAP, rng)):
        assert 0.0 <= backoff(n, CAP) <= CAP
    assert NoJitter(BASE, CAP)(n, 0.0) == CAP


def test_tiny_base_still_reaches_the_cap_exactly() -> None:
    backoff = NoJitter(1e-300, 10.0)
    assert backoff(2000, 0.0) == 10.0
    assert backoff(10, 0.0) == pytest.approx(1e-300 * 1024)


def test_zero_base_never_waits() -> None:
    assert NoJitter(0.0, 1.0)(5, 0.0) == 0.0
    assert DecorrelatedJitter(0.0, 1.0, random.Random(1))(5, 0.0) == 0.0


def test_full_jitter_stays_in_zero_to_expo_for_every_n() -> None:
    rng = random.Random(42)
    backoff = FullJitter(BASE, CAP, rng)
    for n in range(30):
        for _ in range(200):
            assert 0.0 <= backoff(n, 0.0) <= expo(n)


def test_full_jitter_mean_is_half_the_exponential() -> None:
    backoff = FullJitter(BASE, CAP, random.Random(3))
    samples = [backoff(2, 0.0) for _ in range(20_000)]
    assert statistics.fmean(samples) == pytest.approx(expo(2) / 2, rel=0.02)


def test_equal_jitter_stays_in_half_to_full_expo() -> None:
    rng = random.Random(5)
    backoff = EqualJitter(BASE, CAP, rng)
    for n in range(30):
        for _ in range(200):
            assert expo(n) / 2 <= backoff(n, 0.0) <= expo(n)
    samples = [backoff(3, 0.0) for _ in range(20_000)]
    assert statistics.fmean(samples) == pytest.approx(0.75 * expo(3), rel=0.02)


def test_decorrelated_jitter_stays_in_base_to_max() -> None:
    backoff = DecorrelatedJitter(BASE, CAP, random.Random(9))
    previous = 0.0
    for n in range(5000):
        previous = backoff(n, previous)
        assert BASE <= previous <= CAP


def test_decorrelated_jitter_grows_from_the_previous_wait() -> None:
    backoff = DecorrelatedJitter(0.01, 100.0, random.Random(11))
    after_small = [backoff(0, 0.01) for _ in range(5000)]
    after_large = [backoff(0, 10.0) for _ in range(5000)]
    assert max(after_small) <= 0.03
    assert statistics.fmean(after_large) == pytest.approx((0.01 + 30.0) / 2, rel=0.05)


def test_decorrelated_jitter_tolerates_hostile_previous_values() -> None:
    backoff = DecorrelatedJitter(BASE, CAP, random.Random(1))
    for previous in (float("inf"), float("nan"), -5.0, 1e308):
        assert BASE <= backoff(0, previous) <= CAP


@pytest.mark.parametrize(
    ("base", "cap"), [(-0.1, 1.0), (2.0, 1.0), (float("nan"), 1.0), (0.1, float("inf"))]
)
def test_bad_arguments_fail_in_the_constructor(base: float, cap: float) -> None:
    with pytest.raises(ValueError):
        NoJitter(base, cap)
    with pytest.raises(ValueError):
        FullJitter(base, cap, random.Random())


@pytest.mark.parametrize(
    ("jitter", "kind"),
    [("full", FullJitter), ("equal", EqualJitter), ("decorrelated", DecorrelatedJitter), ("none", NoJitter)],
)
def test_backoff_from_config_picks_the_jitter(jitter: str, kind: type) -> None:
    cfg = BackoffConfig(base=0.1, max=2.0, jitter=jitter)  # type: ignore[arg-type]
    backoff = backoff_from_config(cfg, random.Random(0))
    assert isinstance(backoff, kind)
    assert 0.0 <= backoff(3, 0.0) <= 2.0


NOW = 1_700_000_000.0


@pytest.mark.parametrize(("value", "expected"), [("0", 0.0), ("120", 120.0), (" 7 ", 7.0), ("1.5", 1.5)])
def test_retry_after_delta_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_http_date_in_the_future() -> None:
    when = datetime.fromtimestamp(NOW + 90, tz=UTC)
    assert parse_retry_after(format_datetime(when, usegmt=True), NOW) == pytest.approx(90.0)


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == 0.0


def test_retry_after_minus_zero_zone_is_read_as_utc() -> None:
    when = datetime.fromtimestamp(NOW + 30, tz=UTC)
    text = format_datetime(when).replace("+0000", "-0000")
    assert parse_retry_after(text, NOW) == pytest.approx(30.0)


@pytest.mark.parametrize(
    "value", ["", "soon", "-5", "+5", "1e3", "nan", "inf", "NaN", "12abc", "9" * 400, "Mon, 99 Foo 2020"]
)
def test_retry_after_garbage_is_none(value: str) -> None:
    assert parse_retry_after(value, NOW) is None


def test_ratelimit_reset_delta_seconds() -> None:
    assert parse_ratelimit_reset("30", NOW) == 30.0
    assert parse_ratelimit_reset("0.25", NOW) == 0.25


def test_ratelimit_reset_unix_timestamp_is_relative_to_now() -> None:
    assert parse_ratelimit_reset(str(int(NOW) + 42), NOW) == pytest.approx(42.0)
    assert parse_ratelimit_reset(str(int(NOW) - 42), NOW) == 0.0


@pytest.mark.parametrize("value", ["", "-1", "abc", "inf", "nan", "1e5"])
def test_ratelimit_reset_garbage_is_none(value: str) -> None:
    assert parse_ratelimit_reset(value, NOW) is None


def test_retry_after_result_is_always_finite() -> None:
    for value in ("1" * 300, "Fri, 31 Dec 9999 23:59:59 GMT"):
        result = parse_retry_after(value, NOW)
        assert result is None or math.isfinite(result)
