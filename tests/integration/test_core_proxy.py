"""The edge end to end: header handling both ways, and the errors Outrigger answers itself."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.chain import ProxyRequest, ProxyResponse
from proxy.lifecycle.sidecar import Sidecar
from tests.support.ports import free_port
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, Reset, ScriptedUpstream

Factory = Callable[..., Awaitable[Sidecar]]
VALID_TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ERROR_KEYS = {"error", "message", "route", "upstream", "request_id"}


def _url(sidecar: Sidecar, path: str = "/") -> str:
    return f"http://127.0.0.1:{sidecar.port('main')}{path}"


async def _raw(port: int, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Send exact bytes, read until close: (status line, lower-cased headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status.encode(), headers, body


class RawUpstream:
    """Answers every request with fixed bytes, recording request heads; for exact response headers."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.heads: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(self.response)
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def _closed_port() -> int:
    return free_port()  # nothing listens there


def _no_retry(url: str, **route: Any) -> dict[str, Any]:
    return base_config(url, retry={"max_attempts": 1}, **route)


async def _error(resp: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status
    assert resp.headers["x-outrigger-error"] == code
    assert resp.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = json.loads(await resp.read())
    assert set(body) == ERROR_KEYS
    assert body["error"] == code
    assert body["request_id"] == resp.headers["x-request-id"]
    return body


# --- headers, both directions ---


async def test_upstream_sees_its_own_host_forwarding_headers_and_no_hop_by_hop_headers(
        upstream: ScriptedUpstream, sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    status, _, _ = await _raw(sidecar.port("main"), (
        b"GET /a/b?q=1 HTTP/1.1\r\nHost: app.local:15001\r\nConnection: close, X-Drop\r\nX-Drop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\nProxy-Foo: 1\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nX-Keep: yes\r\nAuthorization: Bearer t\r\n\r\n"))
    assert status.startswith(b"HTTP/1.1 200")
    seen = upstream.requests[0]
    assert seen.path == "/a/b?q=1"
    assert seen.headers["host"] == f"127.0.0.1:{upstream.port}"
    assert seen.headers["x-forwarded-host"] == "app.local:15001"
    assert seen.headers["x-forwarded-proto"] == "http"
    assert seen.headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen.headers["x-keep"] == "yes" and seen.headers["authorization"] == "Bearer t"
    for name in ("x-drop", "keep-alive", "te", "proxy-authorization", "proxy-foo"):
        assert name not in seen.headers
    assert "x-drop" not in seen.headers.get("connection", "").lower()


async def test_upstream_url_path_prefix_and_rewrite_prefix_shape_the_exact_request_target(
        sidecar_factory: Factory) -> None:
    async with RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") as raw:
        data = base_config(f"http://127.0.0.1:{raw.port}/base", match={"path_prefix": "/v1/charges"},
                           rewrite_prefix="/api/charges")
        sidecar = await sidecar_factory(data)
        status, _, _ = await _raw(sidecar.port("main"), b"GET /v1/charges/ch%201?expand=a%2Fb&x=%2e HTTP/1.1\r\n"
                                                        b"Host: app\r\nConnection: close\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200")
    assert raw.heads[0].startswith(b"GET /base/api/charges/ch%201?expand=a%2Fb&x=%2e HTTP/1.1\r\n")


async def test_response_hop_by_hop_and_connection_listed_headers_do_not_reach_the_app(
        sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    response = (b"HTTP/1.1 200 OK\r\nConnection: close, X-Internal\r\nX-Internal: secret\r\n"
                b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nX-Public: 1\r\nContent-Length: 2\r\n\r\nok")
    async with RawUpstream(response) as raw:
        sidecar = await sidecar_factory(base_config(f"http://127.0.0.1:{raw.port}"))
        async with client.get(_url(sidecar)) as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
            assert resp.headers["X-Public"] == "1"
            for name in ("X-Internal", "Keep-Alive", "Proxy-Authenticate"):
                assert name not in resp.headers
            assert "x-internal" not in resp.headers.get("Connection", "").lower()


async def test_request_id_is_generated_passed_upstream_and_returned(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(_url(sidecar)) as resp:
        rid = resp.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert upstream.requests[0].headers["x-request-id"] == rid


async def test_valid_request_id_is_kept_and_malformed_one_replaced_end_to_end(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(_url(sidecar), headers={"x-request-id": "app-req-42"}) as resp:
        assert resp.headers["x-request-id"] == "app-req-42"
    async with client.get(_url(sidecar), headers={"x-request-id": "bad id;<x>"}) as resp:
        replaced = resp.headers["x-request-id"]
    assert replaced != "bad id;<x>"
    assert [r.headers["x-request-id"] for r in upstream.requests] == ["app-req-42", replaced]


async def test_malformed_traceparent_is_not_forwarded_and_valid_one_is(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))  # tracing off: pure pass-through rules
    async with client.get(_url(sidecar), headers={"traceparent": "00-zz-yy-01"}):
        pass
    async with client.get(_url(sidecar), headers={"traceparent": VALID_TRACEPARENT}):
        pass
    assert "traceparent" not in upstream.requests[0].headers
    assert upstream.requests[1].headers["traceparent"] == VALID_TRACEPARENT


async def test_expect_100_continue_is_answered_before_the_body_is_sent(
        upstream: ScriptedUpstream, sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    writer.write(b"POST /up HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
                 b"Connection: close\r\n\r\n")
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(b"hello")
    final = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    assert final.startswith(b"HTTP/1.1 200")
    assert upstream.requests[0].body_size == 5
    assert "expect" not in upstream.requests[0].headers


# --- errors Outrigger answers itself ---


async def test_no_route_is_404_with_the_error_body(upstream: ScriptedUpstream, sidecar_factory: Factory,
                                                   client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url, match={"path_prefix": "/v1"}))
    async with client.get(_url(sidecar, "/v2/x")) as resp:
        body = await _error(resp, 404, "no_route")
    assert body["route"] is None and body["upstream"] is None
    assert upstream.requests == []


async def test_unreachable_upstream_is_503_upstream_connect_failure(
        sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(f"http://127.0.0.1:{_closed_port()}"))
    async with client.get(_url(sidecar)) as resp:
        body = await _error(resp, 503, "upstream_connect_failure")
    assert (body["route"], body["upstream"]) == ("default", "svc")


async def test_upstream_reset_before_headers_is_502_upstream_reset(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    upstream.script(Reset())
    sidecar = await sidecar_factory(_no_retry(upstream.url))
    async with client.get(_url(sidecar)) as resp:
        await _error(resp, 502, "upstream_reset")


async def test_upstream_slower_than_the_attempt_timeout_is_504_upstream_timeout(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(delay=2))
    sidecar = await sidecar_factory(_no_retry(upstream.url, timeout={"attempt": "200ms", "total": "1s"}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with client.get(_url(sidecar)) as resp:
        await _error(resp, 504, "upstream_timeout")
    assert loop.time() - started < 1


async def test_body_over_max_body_bytes_with_content_length_is_413_without_upstream_call(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url)
    data["limits"] = {"max_body_bytes": "1KiB"}
    sidecar = await sidecar_factory(data)
    async with client.post(_url(sidecar), data=b"x" * 1025) as resp:
        await _error(resp, 413, "request_too_large")
    async with client.post(_url(sidecar), data=b"x" * 1024) as resp:
        assert resp.status == 200
    assert [r.body_size for r in upstream.requests] == [1024]


async def test_chunked_body_growing_over_max_body_bytes_is_413(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url)
    data["limits"] = {"max_body_bytes": "64KiB"}
    sidecar = await sidecar_factory(data)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 32 * 1024

    async with client.post(_url(sidecar), data=chunks()) as resp:
        await _error(resp, 413, "request_too_large")
    assert all(r.body_size <= 64 * 1024 for r in upstream.requests)


@pytest.mark.parametrize(("name", "value"), [
    ("x-outrigger-timeout-ms", "-1"), ("x-outrigger-timeout-ms", "NaN"), ("x-outrigger-timeout-ms", "1e999"),
    ("x-outrigger-max-attempts", "0"), ("x-outrigger-max-attempts", "lots"),
])
async def test_garbage_override_header_is_400_bad_request_without_upstream_call(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession, name: str,
        value: str) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(_url(sidecar), headers={name: value}) as resp:
        await _error(resp, 400, "bad_request")
    assert upstream.requests == []


async def test_error_body_never_echoes_request_header_values(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url, match={"path_prefix": "/v1"}))
    hostile = "<script>alert(1)</script>"
    async with client.get(_url(sidecar, "/nope"), headers={"x-request-id": hostile, "x-tenant": hostile,
                                                            "x-outrigger-timeout-ms": "<b>"}) as resp:
        raw = await resp.read()
        assert resp.status in (400, 404)
        assert all(hostile not in v for v in resp.headers.values())
    assert b"script" not in raw and b"<b>" not in raw


async def test_internal_exception_is_500_internal_logged_with_request_id_and_the_process_keeps_serving(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    route = sidecar.runtime.routers["main"].routes[0]
    healthy = route.handler

    async def broken(request: ProxyRequest) -> ProxyResponse:
        raise KeyError("a bug inside the chain")

    route.handler = broken
    async with client.get(_url(sidecar)) as resp:
        body = await _error(resp, 500, "internal")
    assert "a bug inside the chain" not in body["message"]  # type name only, no internals
    logged = [r for r in caplog.records if r.name == "outrigger.server" and r.levelno == logging.ERROR]
    assert [getattr(r, "request_id", None) for r in logged] == [body["request_id"]]
    assert logged[0].exc_info is not None
    route.handler = healthy
    async with client.get(_url(sidecar)) as resp:
        assert resp.status == 200 and await resp.read() == b"ok"
