"""Typed proxy errors and the single place they become HTTP responses.

Policies and the upstream client raise ``ProxyError`` subclasses; only the
edge (``proxy.edge``) calls ``to_response``, which gives a transport-neutral
``ErrorReply`` (status, headers, body bytes) that the edge serialises.  Each error carries
its HTTP status, its public ``x-outrigger-error`` code, the ``retry_on``
kind it belongs to (if any) and whether it counts as a breaker failure.
Error bodies never echo request header values back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import ClassVar, NamedTuple

from multidict import CIMultiDict

__all__ = [
    "BadRequest", "CircuitOpen", "ClientTimeout", "DeadlineExceeded", "ErrorReply", "HeadersTooLarge",
    "IdempotencyInProgress", "IdempotencyKeyReused", "Internal", "MethodNotAllowed", "NoRoute", "Overflow",
    "ProxyError", "RateLimited", "RequestTooLarge", "TransferCodingNotImplemented", "UpstreamConnectFailure",
    "UpstreamProtocolError", "UpstreamReset", "UpstreamTimeout", "UpstreamTlsError", "to_response",
]

ERROR_HEADER = "x-outrigger-error"


class ProxyError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    retry_kind: ClassVar[str | None] = None  # the retry_on value this error matches
    breaker_failure: ClassVar[bool] = False  # counts against the upstream's circuit breaker
    sent: ClassVar[bool] = True  # the request may have reached the upstream
    client_fault: ClassVar[bool] = False  # the app's doing (its body, its pace): says nothing about the upstream

    def __init__(self, message: str, *, retry_after: float | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.headers = headers


class Internal(ProxyError):
    pass


class BadRequest(ProxyError):
    status, code, client_fault = 400, "bad_request", True


class NoRoute(ProxyError):
    status, code = 404, "no_route"


class MethodNotAllowed(ProxyError):
    status, code = 405, "method_not_allowed"


class RequestTooLarge(ProxyError):
    status, code, client_fault = 413, "request_too_large", True


class HeadersTooLarge(ProxyError):
    status, code = 431, "headers_too_large"


class ClientTimeout(ProxyError):
    """The app stalled: it stopped sending its request body, or stopped reading the response.

    Time spent waiting on the app is never the upstream's fault: not a breaker
    failure and never retried.
    """

    status, code, client_fault = 408, "client_timeout", True


class TransferCodingNotImplemented(ProxyError):
    """A request ``Transfer-Encoding`` other than plain ``chunked`` (``gzip, chunked``...)."""

    status, code = 501, "not_implemented"


class RateLimited(ProxyError):
    status, code, sent = 429, "rate_limited", False


class UpstreamConnectFailure(ProxyError):
    status, code, retry_kind, breaker_failure, sent = 503, "upstream_connect_failure", "connect-failure", True, False


class UpstreamTlsError(ProxyError):
    """The upstream's certificate did not verify; retrying cannot help."""

    status, code, breaker_failure, sent = 502, "upstream_tls_error", True, False


class UpstreamReset(ProxyError):
    status, code, retry_kind, breaker_failure = 502, "upstream_reset", "reset", True


class UpstreamProtocolError(ProxyError):
    """The upstream answered with something that is not valid HTTP."""

    status, code, retry_kind, breaker_failure = 502, "upstream_protocol_error", "reset", True


class UpstreamTimeout(ProxyError):
    status, code, retry_kind, breaker_failure = 504, "upstream_timeout", "timeout", True


class DeadlineExceeded(ProxyError):
    status, code = 504, "deadline_exceeded"


class CircuitOpen(ProxyError):
    status, code, sent = 503, "circuit_open", False


class Overflow(ProxyError):
    status, code, sent = 503, "overflow", False


class IdempotencyKeyReused(ProxyError):
    """The Idempotency-Key was first used with another method, path or body (IETF httpapi draft: 422)."""

    status, code, sent = 422, "idempotency_key_reused", False


class IdempotencyInProgress(ProxyError):
    """A request with the same Idempotency-Key is still in flight, on this replica or another (409)."""

    status, code, sent = 409, "idempotency_in_progress", False


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class ErrorReply(NamedTuple):
    """An error response as plain values; the edge adds framing and connection headers."""

    status: int
    headers: CIMultiDict[str]
    body: bytes


def to_response(error: ProxyError, *, route: str | None, upstream: str | None, request_id: str) -> ErrorReply:
    body = {
        "error": error.code,
        "message": error.message,
        "route": route,
        "upstream": upstream,
        "request_id": request_id,
    }
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Content-Type"] = "application/json; charset=utf-8"
    headers[ERROR_HEADER] = error.code
    headers["x-request-id"] = request_id
    headers["Cache-Control"] = "no-store"
    if error.retry_after is not None:
        headers["Retry-After"] = retry_after_header(error.retry_after)
    if error.headers:
        headers.update(error.headers)
    return ErrorReply(error.status, headers, json.dumps(body).encode())
