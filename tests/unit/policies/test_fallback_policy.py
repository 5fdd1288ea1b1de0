"""Fallback: a configured response stands in for selected proxy errors, and only those."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy.chain import ProxyRequest, ProxyResponse, RequestBody
from proxy.config.types import FallbackConfig
from proxy.errors import (
    CircuitOpen,
    Overflow,
    ProxyError,
    RateLimited,
    UpstreamProtocolError,
    UpstreamReset,
    UpstreamTimeout,
    UpstreamTlsError,
)
from proxy.policies.fallback import Fallback


def request() -> ProxyRequest:
    return ProxyRequest("GET", "/", CIMultiDict(), RequestBody(None), request_id="rid")


def raising(error: ProxyError) -> object:
    async def call_next(req: ProxyRequest) -> ProxyResponse:
        raise error
    return call_next


async def test_circuit_open_is_replaced_by_the_configured_response() -> None:
    fallback = Fallback(FallbackConfig(status=200, body='{"degraded": true}', content_type="application/json"))
    error = CircuitOpen("open", retry_after=3.0)
    response = await fallback(request(), raising(error))  # type: ignore[arg-type]
    assert response.status == 200
    assert response.body == b'{"degraded": true}'
    assert response.headers["x-outrigger-fallback"] == "true"
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Content-Length"] == str(len(b'{"degraded": true}'))
    assert response.upstream is None
    assert response.error == "circuit_open"


@pytest.mark.parametrize("error", [
    Overflow("full"), UpstreamReset("reset"), UpstreamTimeout("slow"), RateLimited("slow down"),
])
async def test_errors_not_configured_pass_through(error: ProxyError) -> None:
    fallback = Fallback(FallbackConfig(status=503, body="x"))
    with pytest.raises(type(error)):
        await fallback(request(), raising(error))  # type: ignore[arg-type]


async def test_every_configured_error_code_is_covered() -> None:
    fallback = Fallback(FallbackConfig(status=503, body="x", on=("overflow", "upstream_timeout")))
    for error in (Overflow("full"), UpstreamTimeout("slow")):
        response = await fallback(request(), raising(error))  # type: ignore[arg-type]
        assert response.headers["x-outrigger-fallback"] == "true"
    with pytest.raises(CircuitOpen):
        await fallback(request(), raising(CircuitOpen("open")))  # type: ignore[arg-type]


async def test_protocol_and_tls_errors_can_be_covered_too() -> None:
    from proxy.config import load_config
    config = load_config("""
version: 1
upstreams: {svc: {url: "http://svc:8080"}}
listeners: [{name: m, address: "127.0.0.1:1", routes: [{name: d, upstream: svc,
  fallback: {on: [upstream_protocol_error, upstream_tls_error]}}]}]
""", env={})
    fallback_config = config.listeners[0].routes[0].fallback
    assert fallback_config is not None
    fallback = Fallback(fallback_config)
    for error in (UpstreamProtocolError("garbage"), UpstreamTlsError("bad cert")):
        response = await fallback(request(), raising(error))  # type: ignore[arg-type]
        assert response.status == 503 and response.body == b'{"degraded": true}'


async def test_upstream_responses_pass_through_untouched() -> None:
    fallback = Fallback(FallbackConfig(status=200, body="x"))
    original = ProxyResponse(503, CIMultiDict({"a": "b"}))

    async def call_next(req: ProxyRequest) -> ProxyResponse:
        return original

    assert await fallback(request(), call_next) is original
