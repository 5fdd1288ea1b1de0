"""Retry policy on fake time: what is retried, what is not, how long it waits, and the budget."""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.chain import ProxyRequest, ProxyResponse, RequestBody
from proxy.clock import FakeClock
from proxy.config.types import BackoffConfig, BudgetConfig, RetryConfig
from proxy.errors import (
    CircuitOpen,
    DeadlineExceeded,
    Overflow,
    ProxyError,
    UpstreamConnectFailure,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
)
from proxy.policies.backoff import FullJitter, NoJitter, backoff_from_config
from proxy.policies.budget import RetryBudget
from proxy.policies.retry import Retry
from proxy.telemetry.metrics import Metrics, RouteMetrics
from tests.support.spans import EventSpan, record_events

WALL = 1_700_000_000.0




class Upstream:
    """A scripted ``call_next``: each attempt takes the next outcome (status, headers) or error class."""

    def __init__(self, *outcomes: Any, send_body: bool = True) -> None:
        self.outcomes = deque(outcomes)
        self.attempts: list[int] = []
        self.responses: list[ProxyResponse] = []
        self.released: list[int] = []
        self.send_body = send_body

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        self.attempts.append(request.attempt)
        outcome = self.outcomes.popleft() if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, type) and issubclass(outcome, ProxyError):
            if outcome.sent and self.send_body:
                request.body.payload()  # what the upstream call does once it starts sending
            raise outcome("scripted")
        if self.send_body:
            request.body.payload()
        status, headers = outcome if isinstance(outcome, tuple) else (outcome, {})
        response = ProxyResponse(status, CIMultiDict(headers))
        index = len(self.responses)
        response.on_release(lambda: self.released.append(index))
        self.responses.append(response)
        return response


def make_config(**overrides: Any) -> RetryConfig:
    fields: dict[str, Any] = {
        "max_attempts": 3,
        "backoff": BackoffConfig(base=0.1, max=1.0, jitter="none"),  # type: ignore[arg-type]
        "budget": BudgetConfig(ratio=0.2, min_per_second=10.0, window=10.0),  # type: ignore[arg-type]
    }
    fields.update(overrides)
    return RetryConfig(**fields)


class Harness:
    def __init__(self, seed: int = 7, **overrides: Any) -> None:
        self.clock = FakeClock()
        self.config = make_config(**overrides)
        self.metrics_root = Metrics(process_collectors=False)
        self.metrics: RouteMetrics = self.metrics_root.for_route("r", "u")
        self.budget = RetryBudget.from_config(self.config.budget, self.clock)
        self.rng = random.Random(seed)
        self.retry = Retry(self.config, budget=self.budget, backoff=backoff_from_config(self.config.backoff, self.rng),
                           clock=self.clock, metrics=self.metrics, wall=lambda: WALL)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics_root.registry.get_sample_value(name, {"route": "r", "upstream": "u", **labels})
        return value or 0.0

    async def send(self, upstream: Upstream, request: ProxyRequest) -> ProxyResponse:
        return await self.retry(request, upstream)


def make_request(method: str = "GET", headers: dict[str, str] | None = None, body: RequestBody | None = None,
                 *, deadline: float = math.inf, max_attempts: int | None = None) -> ProxyRequest:
    request = ProxyRequest(method, "/x", CIMultiDict(headers or {}), body or RequestBody(b"payload"),
                           request_id="rid", max_attempts=max_attempts)
    request.deadline = deadline
    record_events(request)
    return request


def events(request: ProxyRequest) -> list[str]:
    assert isinstance(request.span, EventSpan)
    return request.span.names()


# --- each retry_on kind ---


@pytest.mark.parametrize(("kind", "failure", "reason"), [
    ("connect-failure", UpstreamConnectFailure, "connect_failure"),
    ("reset", UpstreamReset, "reset"),
    ("reset", UpstreamProtocolError, "reset"),
    ("timeout", UpstreamTimeout, "timeout"),
    ("gateway-error", 502, "http_502"),
    ("gateway-error", 503, "http_503"),
    ("gateway-error", 504, "http_504"),
    ("5xx", 500, "http_500"),
    ("5xx", 507, "http_507"),
    ("retriable-status-codes", 429, "http_429"),
    ("retriable-status-codes", 409, "http_409"),
])
async def test_each_retry_on_kind_is_retried(kind: str, failure: Any, reason: str) -> None:
    h = Harness(retry_on=(kind,), retriable_status_codes=(409, 429))
    upstream = Upstream(failure, 200)
    response = await h.send(upstream, make_request())
    assert response.status == 200
    assert upstream.attempts == [1, 2]
    assert h.sample("outrigger_retries_total", reason=reason) == 1


@pytest.mark.parametrize(("kind", "failure"), [
    ("gateway-error", UpstreamConnectFailure),
    ("connect-failure", UpstreamReset),
    ("reset", UpstreamTimeout),
    ("connect-failure", 503),
    ("gateway-error", 500),
    ("gateway-error", 429),
    ("retriable-status-codes", 502),
])
async def test_failures_outside_retry_on_are_not_retried(kind: str, failure: Any) -> None:
    h = Harness(retry_on=(kind,), retriable_status_codes=(429,))
    upstream = Upstream(failure, 200)
    if isinstance(failure, int):
        assert (await h.send(upstream, make_request())).status == failure
    else:
        with pytest.raises(failure):
            await h.send(upstream, make_request())
    assert upstream.attempts == [1]


@pytest.mark.parametrize("status", [400, 404, 409, 422])
async def test_4xx_is_returned_without_retry(status: int) -> None:
    h = Harness()
    upstream = Upstream(status, 200)
    response = await h.send(upstream, make_request())
    assert (response.status, upstream.attempts) == (status, [1])
    assert upstream.released == []


@pytest.mark.parametrize("error", [CircuitOpen, Overflow, DeadlineExceeded])
async def test_policy_errors_are_never_retried(error: type[ProxyError]) -> None:
    h = Harness()
    upstream = Upstream(error, 200)
    with pytest.raises(error):
        await h.send(upstream, make_request())
    assert upstream.attempts == [1]


async def test_attempts_stop_at_max_attempts_and_last_response_is_returned_unreleased() -> None:
    h = Harness(max_attempts=3)
    upstream = Upstream(503)
    response = await h.send(upstream, make_request())
    assert response.status == 503
    assert upstream.attempts == [1, 2, 3]
    assert upstream.released == [0, 1]  # discarded attempts freed at once; the last one is the caller's
    assert response is upstream.responses[-1]


async def test_the_last_error_is_raised_after_max_attempts() -> None:
    h = Harness(max_attempts=3)
    upstream = Upstream(UpstreamReset)
    with pytest.raises(UpstreamReset):
        await h.send(upstream, make_request())
    assert upstream.attempts == [1, 2, 3]


# --- idempotency and bodies ---


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_post_without_idempotency_key_is_not_retried_after_send(method: str) -> None:
    h = Harness()
    for failure in (503, UpstreamReset, UpstreamTimeout):
        upstream = Upstream(failure, 200)
        if isinstance(failure, int):
            assert (await h.send(upstream, make_request(method))).status == 503
        else:
            with pytest.raises(failure):
                await h.send(upstream, make_request(method))
        assert upstream.attempts == [1]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])
async def test_idempotent_methods_are_retried_after_send(method: str) -> None:
    h = Harness()
    upstream = Upstream(UpstreamReset, 200)
    assert (await h.send(upstream, make_request(method))).status == 200
    assert upstream.attempts == [1, 2]


async def test_post_with_idempotency_key_is_retried() -> None:
    h = Harness()
    upstream = Upstream(503, UpstreamReset, 200)
    response = await h.send(upstream, make_request("POST", {"Idempotency-Key": "k-1"}))
    assert (response.status, upstream.attempts) == (200, [1, 2, 3])


async def test_post_is_retried_when_route_sets_retry_non_idempotent() -> None:
    h = Harness(retry_non_idempotent=True)
    upstream = Upstream(503, 200)
    assert (await h.send(upstream, make_request("POST"))).status == 200
    assert upstream.attempts == [1, 2]


async def test_connect_failure_is_retried_for_post() -> None:
    """The request never reached the upstream, so resending is safe for any method."""
    h = Harness()
    upstream = Upstream(UpstreamConnectFailure, UpstreamConnectFailure, 201)
    response = await h.send(upstream, make_request("POST"))
    assert (response.status, upstream.attempts) == (201, [1, 2, 3])


async def _chunks() -> AsyncIterator[bytes]:
    yield b"rest-of-a-big-body"


async def test_streamed_body_is_not_retried_after_send_even_for_put() -> None:
    h = Harness()
    body = RequestBody(prefix=b"p" * 10, stream=_chunks())
    upstream = Upstream(503, 200)
    response = await h.send(upstream, make_request("PUT", body=body))
    assert (response.status, upstream.attempts) == (503, [1])
    assert not body.replayable


async def test_streamed_body_is_retried_when_nothing_was_sent() -> None:
    h = Harness()
    body = RequestBody(prefix=b"p", stream=_chunks())
    upstream = Upstream(UpstreamConnectFailure, 200)
    assert (await h.send(upstream, make_request("PUT", body=body))).status == 200
    assert upstream.attempts == [1, 2]


async def test_streamed_body_reset_after_send_is_not_retried() -> None:
    h = Harness()
    body = RequestBody(prefix=b"p", stream=_chunks())
    with pytest.raises(UpstreamReset):
        await h.send(Upstream(UpstreamReset, 200), make_request("PUT", body=body))


# --- max_attempts override ---


async def test_max_attempts_override_tightens() -> None:
    h = Harness(max_attempts=3)
    upstream = Upstream(503)
    response = await h.send(upstream, make_request(max_attempts=1))
    assert (response.status, upstream.attempts) == (503, [1])


async def test_max_attempts_override_never_loosens() -> None:
    h = Harness(max_attempts=2)
    upstream = Upstream(503)
    response = await h.send(upstream, make_request(max_attempts=10))
    assert (response.status, upstream.attempts) == (503, [1, 2])


# --- backoff ---


async def test_exponential_backoff_waits_match_the_formula() -> None:
    h = Harness(max_attempts=6, backoff=BackoffConfig(base=0.1, max=0.5, jitter="none"))  # type: ignore[arg-type]
    await h.send(Upstream(503), make_request())
    assert h.clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


@pytest.mark.parametrize("jitter", ["full", "equal", "decorrelated"])
async def test_jittered_backoff_waits_match_the_seeded_formula(jitter: str) -> None:
    config = BackoffConfig(base=0.025, max=0.25, jitter=jitter)  # type: ignore[arg-type]
    h = Harness(seed=11, max_attempts=5, backoff=config)
    await h.send(Upstream(503), make_request())
    expected_rng = random.Random(11)
    expected, previous = [], 0.0
    for n in range(4):
        expo = min(0.25, 0.025 * 2**n)
        if jitter == "full":
            wait = expected_rng.uniform(0.0, expo)
        elif jitter == "equal":
            wait = expo / 2 + expected_rng.uniform(0.0, expo / 2)
        else:
            wait = min(0.25, expected_rng.uniform(0.025, max(0.025, previous * 3)))
        expected.append(wait)
        previous = wait
    assert h.clock.sleeps == pytest.approx(expected)
    assert all(0.0 <= wait <= 0.25 for wait in h.clock.sleeps)


async def test_full_jitter_waits_stay_within_the_exponential_bound() -> None:
    clock = FakeClock()
    metrics = Metrics(process_collectors=False).for_route("r", "u")
    config = make_config(max_attempts=4, budget=BudgetConfig(ratio=10.0, min_per_second=1000.0))
    retry = Retry(config, budget=RetryBudget.from_config(config.budget, clock),
                  backoff=FullJitter(0.1, 1.0, random.Random(3)), clock=clock, metrics=metrics)
    for _ in range(200):
        clock.sleeps.clear()
        await retry(make_request(), Upstream(503))
        for n, wait in enumerate(clock.sleeps):
            assert 0.0 <= wait <= 0.1 * 2**n


async def test_backoff_span_events_name_reason_and_attempt() -> None:
    h = Harness(max_attempts=2)
    request = make_request()
    await h.send(Upstream(UpstreamReset, 200), request)
    assert isinstance(request.span, EventSpan)
    assert request.span.events == [
        ("backoff", {"outrigger.wait_s": 0.1, "outrigger.reason": "reset", "outrigger.attempt": 1}),
    ]


async def test_unsampled_request_builds_no_events() -> None:
    h = Harness(max_attempts=2)
    request = make_request()
    request.span = None
    assert (await h.send(Upstream(503, 200), request)).status == 200


# --- Retry-After ---


async def test_retry_after_seconds_is_honoured_instead_of_backoff() -> None:
    h = Harness()
    request = make_request()
    response = await h.send(Upstream((503, {"Retry-After": "2"}), 200), request)
    assert response.status == 200
    assert h.clock.sleeps == [2.0]
    assert events(request) == ["retry_after_honoured", "backoff"]


async def test_retry_after_http_date_is_honoured() -> None:
    h = Harness()
    await h.send(Upstream((429, {"Retry-After": "Tue, 14 Nov 2023 22:13:23 GMT"}), 200), make_request())
    assert h.clock.sleeps == [pytest.approx(3.0)]  # WALL is 22:13:20 GMT


async def test_ratelimit_reset_is_used_when_retry_after_is_missing() -> None:
    h = Harness()
    await h.send(Upstream((429, {"X-RateLimit-Reset": "1.5"}), 200), make_request())
    assert h.clock.sleeps == [1.5]


async def test_invalid_retry_after_falls_back_to_backoff() -> None:
    h = Harness()
    await h.send(Upstream((503, {"Retry-After": "soon"}), 200), make_request())
    assert h.clock.sleeps == [0.1]


async def test_retry_after_on_other_statuses_is_ignored() -> None:
    h = Harness()
    await h.send(Upstream((502, {"Retry-After": "30"}), 200), make_request())
    assert h.clock.sleeps == [0.1]


async def test_retry_after_is_ignored_when_not_respected() -> None:
    h = Harness(respect_retry_after=False)
    await h.send(Upstream((503, {"Retry-After": "30"}), 200), make_request())
    assert h.clock.sleeps == [0.1]


async def test_retry_after_within_the_deadline_is_waited_for() -> None:
    h = Harness()
    request = make_request(deadline=h.clock.now() + 3.0)
    assert (await h.send(Upstream((503, {"Retry-After": "2"}), 200), request)).status == 200
    assert h.clock.sleeps == [2.0]


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_beyond_the_deadline_returns_the_response_as_is(status: int) -> None:
    h = Harness()
    request = make_request(deadline=h.clock.now() + 1.0)
    upstream = Upstream((status, {"Retry-After": "5"}), 200)
    response = await h.send(upstream, request)
    assert response.status == status
    assert response.headers["Retry-After"] == "5"
    assert response is upstream.responses[0] and upstream.released == []
    assert h.clock.sleeps == []
    assert upstream.attempts == [1]
    assert events(request) == ["retry_abandoned"]
    assert h.sample("outrigger_retries_total", reason=f"http_{status}") == 0


async def test_backoff_that_would_end_past_the_deadline_is_not_slept() -> None:
    h = Harness(backoff=BackoffConfig(base=0.5, max=0.5, jitter="none"))  # type: ignore[arg-type]
    request = make_request(deadline=h.clock.now() + 0.4)
    with pytest.raises(UpstreamReset):
        await h.send(Upstream(UpstreamReset, 200), request)
    assert h.clock.sleeps == []


async def test_retries_stop_once_backoff_reaches_the_deadline() -> None:
    h = Harness(max_attempts=10, backoff=BackoffConfig(base=0.1, max=1.0, jitter="none"))  # type: ignore[arg-type]
    request = make_request(deadline=h.clock.now() + 0.75)
    await h.send(Upstream(503), request)
    assert h.clock.sleeps == pytest.approx([0.1, 0.2, 0.4])  # 0.7 slept; the next 0.8 would cross 0.75
    assert sum(h.clock.sleeps) < 0.75


# --- budget ---


async def test_budget_exhaustion_returns_last_response_as_is_and_counts() -> None:
    budget = BudgetConfig(ratio=0.0, min_per_second=0.1, window=10.0)  # type: ignore[arg-type]  # one retry
    h = Harness(max_attempts=5, budget=budget)
    request = make_request()
    upstream = Upstream(503)
    response = await h.send(upstream, request)
    assert upstream.attempts == [1, 2]
    assert response is upstream.responses[1] and response.status == 503
    assert upstream.released == [0]
    assert h.sample("outrigger_retry_budget_exhausted_total") == 1
    assert h.sample("outrigger_retries_total", reason="http_503") == 1
    assert "retry_budget_exhausted" in events(request)


async def test_budget_exhaustion_raises_the_last_error_as_is() -> None:
    budget = BudgetConfig(ratio=0.0, min_per_second=0.0, window=10.0)  # type: ignore[arg-type]
    h = Harness(budget=budget)
    upstream = Upstream(UpstreamReset)
    with pytest.raises(UpstreamReset):
        await h.send(upstream, make_request())
    assert upstream.attempts == [1]
    assert h.sample("outrigger_retry_budget_exhausted_total") == 1


async def test_budget_allows_ratio_of_requests_plus_floor() -> None:
    budget = BudgetConfig(ratio=0.2, min_per_second=0.0, window=10.0)  # type: ignore[arg-type]
    h = Harness(max_attempts=2, budget=budget)
    upstream = Upstream(503)
    for _ in range(100):
        await h.send(upstream, make_request())
    retries = len(upstream.attempts) - 100
    assert retries == 20
    assert h.sample("outrigger_retry_budget_exhausted_total") == 80
    assert h.budget.remaining() == 0


async def test_budget_refills_as_the_window_slides() -> None:
    budget = BudgetConfig(ratio=0.0, min_per_second=0.1, window=10.0)  # type: ignore[arg-type]
    h = Harness(max_attempts=2, budget=budget)
    upstream = Upstream(503)
    await h.send(upstream, make_request())
    await h.send(upstream, make_request())
    assert len(upstream.attempts) == 3
    h.clock.advance(11.0)
    await h.send(upstream, make_request())
    assert len(upstream.attempts) == 5


async def test_every_original_request_is_recorded_once_by_the_budget() -> None:
    budget = BudgetConfig(ratio=1.0, min_per_second=0.0, window=10.0)  # type: ignore[arg-type]
    h = Harness(max_attempts=3, budget=budget)
    await h.send(Upstream(200), make_request())
    await h.send(Upstream(200), make_request())
    assert h.budget.remaining() == 2


async def test_no_jitter_backoff_is_deterministic() -> None:
    assert [NoJitter(0.025, 0.25)(n, 0.0) for n in range(5)] == pytest.approx([0.025, 0.05, 0.1, 0.2, 0.25])


@pytest.mark.parametrize("start", [1000.0, 1000.3, 1000.5, 1000.99])
async def test_retries_in_any_window_never_exceed_ratio_times_requests_plus_floor(start: float) -> None:
    """The retry-storm bound: however the run lines up with the budget's buckets, a window is a window."""
    budget = BudgetConfig(ratio=0.2, min_per_second=1.0, window=10.0)  # type: ignore[arg-type]
    h = Harness(max_attempts=3, budget=budget)
    h.clock = FakeClock(start)
    h.budget = RetryBudget.from_config(budget, h.clock)
    h.retry = Retry(h.config, budget=h.budget, backoff=lambda n, p: 0.0, clock=h.clock, metrics=h.metrics)
    upstream = Upstream(503)
    retry_times: list[float] = []
    request_times: list[float] = []
    for _ in range(300):  # 30 s of a 10 rps storm
        request_times.append(h.clock.now())
        before = len(upstream.attempts)
        await h.send(upstream, make_request())
        retry_times.extend([h.clock.now()] * (len(upstream.attempts) - before - 1))
        h.clock.advance(0.1)
    for i, t0 in enumerate(request_times):
        retries = sum(1 for t in retry_times if t0 <= t < t0 + 10.0)
        requests = sum(1 for t in request_times if t0 - 10.0 < t <= t0 + 10.0)
        assert retries <= 0.2 * requests + 10.0, f"window starting at request {i}"
