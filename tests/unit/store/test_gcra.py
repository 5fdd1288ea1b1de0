"""GCRA lease math (``proxy.store.gcra.grant``, the twin of the Lua script) on fake time."""

from __future__ import annotations

import pytest

from proxy.store.gcra import grant

MS = 1000.0  # µs


def test_a_fresh_limit_grants_up_to_burst_at_once() -> None:
    out = grant(0.0, 1e12, interval_us=10 * MS, burst=5, asked=8)
    assert out.granted == 5
    assert out.retry_after_us == pytest.approx(10 * MS, abs=1)  # one more token after one interval
    assert out.full_after_us == pytest.approx(50 * MS, abs=1)


def test_grants_never_exceed_rate_times_time_plus_burst_under_any_asking_pattern() -> None:
    """Whatever replicas ask and whenever, the total granted is bounded by burst + rate * elapsed."""
    interval, burst, tat, now = 10 * MS, 5, 0.0, 1e12
    start, total = now, 0
    for step in range(2000):
        now += (step % 7) * 1.3 * MS  # uneven gaps between calls
        out = grant(tat, now, interval, burst, asked=1 + step % 4)
        tat = out.tat_us if out.granted else tat
        total += out.granted
        assert total <= burst + (now - start) / interval + 1e-6
    elapsed_tokens = (now - start) / interval
    assert total >= elapsed_tokens - 1  # and the askers got (almost) all of it: nothing is lost


def test_a_denied_request_learns_when_the_next_token_is_free() -> None:
    interval = 100 * MS
    first = grant(0.0, 1e12, interval, burst=1, asked=1)
    assert first.granted == 1
    later = grant(first.tat_us, 1e12 + 30 * MS, interval, burst=1, asked=3)
    assert later.granted == 0
    assert later.retry_after_us == pytest.approx(70 * MS, abs=1)
    again = grant(first.tat_us, 1e12 + 100 * MS, interval, burst=1, asked=3)
    assert again.granted == 1


def test_partial_grant_when_fewer_tokens_are_free_than_asked() -> None:
    out = grant(1e12 + 20 * MS, 1e12, 10 * MS, burst=5, asked=10)  # 2 tokens' worth already taken
    assert out.granted == 3
    assert out.tat_us == pytest.approx(1e12 + 50 * MS)
