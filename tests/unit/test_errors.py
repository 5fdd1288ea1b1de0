"""``proxy.errors``: what each ProxyError means, and the single ``to_response`` that renders it.

The table is the public one (docs/errors-and-headers.md): status, code, the
``retry_on`` kind it matches, whether it counts against the breaker, and
whether the request may have reached the upstream.
"""

from __future__ import annotations

import json

import pytest

from proxy import errors
from proxy.errors import ProxyError, to_response
from proxy.upstream.connection import transport_error

# class, status, code, retry kind, breaker failure, sent
TABLE: list[tuple[type[ProxyError], int, str, str | None, bool, bool]] = [
    (errors.Internal, 500, "internal", None, False, True),
    (errors.BadRequest, 400, "bad_request", None, False, True),
    (errors.NoRoute, 404, "no_route", None, False, True),
    (errors.MethodNotAllowed, 405, "method_not_allowed", None, False, True),
    (errors.RequestTooLarge, 413, "request_too_large", None, False, True),
    (errors.HeadersTooLarge, 431, "headers_too_large", None, False, True),
    (errors.RateLimited, 429, "rate_limited", None, False, False),
    (errors.UpstreamConnectFailure, 503, "upstream_connect_failure", "connect-failure", True, False),
    (errors.UpstreamTlsError, 502, "upstream_tls_error", None, True, False),
    (errors.UpstreamReset, 502, "upstream_reset", "reset", True, True),
    (errors.UpstreamProtocolError, 502, "upstream_protocol_error", "reset", True, True),
    (errors.UpstreamTimeout, 504, "upstream_timeout", "timeout", True, True),
    (errors.DeadlineExceeded, 504, "deadline_exceeded", None, False, True),
    (errors.CircuitOpen, 503, "circuit_open", None, False, False),
    (errors.Overflow, 503, "overflow", None, False, False),
    (errors.ClientTimeout, 408, "client_timeout", None, False, True),
    (errors.TransferCodingNotImplemented, 501, "not_implemented", None, False, True),
    (errors.IdempotencyKeyReused, 422, "idempotency_key_reused", None, False, False),
    (errors.IdempotencyInProgress, 409, "idempotency_in_progress", None, False, False),
]


def test_the_table_covers_every_exported_error() -> None:
    exported = {getattr(errors, name) for name in errors.__all__
                if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), ProxyError)}
    assert exported - {ProxyError} == {row[0] for row in TABLE}


@pytest.mark.parametrize(("cls", "status", "code", "kind", "breaker", "sent"), TABLE,
                         ids=[row[2] for row in TABLE])
def test_each_error_type_carries_its_meaning(cls: type[ProxyError], status: int, code: str, kind: str | None,
                                             breaker: bool, sent: bool) -> None:
    error = cls("why")
    assert (error.status, error.code, error.retry_kind) == (status, code, kind)
    assert (error.breaker_failure, error.sent) == (breaker, sent)


@pytest.mark.parametrize(("cls", "status", "code"), [row[:3] for row in TABLE], ids=[row[2] for row in TABLE])
def test_to_response_renders_status_code_header_and_json_body(cls: type[ProxyError], status: int,
                                                              code: str) -> None:
    response = to_response(cls("what happened"), route="orders", upstream="payments", request_id="req-1")
    assert response.status == status
    assert response.headers["x-outrigger-error"] == code
    assert response.headers["x-request-id"] == "req-1"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Type"].startswith("application/json")
    assert "Retry-After" not in response.headers
    assert json.loads(response.body) == {"error": code, "message": "what happened", "route": "orders",
                                         "upstream": "payments", "request_id": "req-1"}


def test_an_unrouted_error_has_null_route_and_upstream() -> None:
    response = to_response(errors.NoRoute("no route for /x"), route=None, upstream=None, request_id="r")
    body = json.loads(response.body)
    assert (body["route"], body["upstream"]) == (None, None)


@pytest.mark.parametrize(("seconds", "header"), [(0.2, "1"), (1.0, "1"), (1.01, "2"), (0.0, "1"), (30.5, "31")])
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(seconds: float, header: str) -> None:
    response = to_response(errors.CircuitOpen("open", retry_after=seconds), route="r", upstream="u",
                           request_id="x")
    assert response.headers["Retry-After"] == header


def test_an_errors_own_headers_are_added_to_the_response() -> None:
    error = errors.RateLimited("slow down", retry_after=2, headers={"RateLimit-Remaining": "0"})
    response = to_response(error, route="r", upstream="u", request_id="x")
    assert (response.headers["RateLimit-Remaining"], response.headers["Retry-After"]) == ("0", "2")


@pytest.mark.parametrize(("exc", "code"), [
    (ConnectionResetError("reset by peer"), "upstream_reset"),
    (BrokenPipeError("broken"), "upstream_reset"),
    (None, "upstream_reset"),
    (RuntimeError("odd"), "upstream_protocol_error"),
])
def test_transport_failures_before_the_head_map_in_one_place(exc: BaseException | None, code: str) -> None:
    error = transport_error(exc, "payments")
    assert error.code == code
    assert "upstream payments" in error.message
