"""Outrigger is not an open proxy: refused requests get a clear error and open no upstream connection;
an absolute-form target is served by its path, never by its authority.

Requests are written as exact bytes on a raw socket, because HTTP clients
normalise away the very things tested here (absolute-form targets, dot
segments, CONNECT).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.lifecycle.sidecar import Sidecar
from tests.support.sidecar import base_config

Factory = Callable[..., Awaitable[Sidecar]]


class CountingUpstream:
    """Counts every TCP connection it accepts and answers each request 200."""

    def __init__(self) -> None:
        self.connections = 0
        self.targets: list[bytes] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.targets.append(head.split(b" ")[1])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def counting() -> AsyncIterator[CountingUpstream]:
    upstream = CountingUpstream()
    server = await asyncio.start_server(upstream._serve, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    yield upstream
    server.close()


@pytest.fixture
async def sidecar(counting: CountingUpstream, sidecar_factory: Factory) -> Sidecar:
    return await sidecar_factory(base_config(f"http://127.0.0.1:{counting.port}", match={"path_prefix": "/v1"}))


async def _send(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


async def _assert_refused(sidecar: Sidecar, counting: CountingUpstream, request: bytes, status: int,
                          code: str) -> None:
    got, headers, body = await _send(sidecar.port("main"), request)
    assert got == status
    assert headers["x-outrigger-error"] == code
    assert json.loads(body)["error"] == code
    await asyncio.sleep(0.05)  # give a (wrongly) started upstream connection time to land
    assert counting.connections == 0
    # ...and the listener keeps serving well-formed requests.
    ok, _, _ = await _send(sidecar.port("main"), b"GET /v1/ok HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    assert ok == 200


@pytest.mark.parametrize("target", [
    b"http://evil.example/v1/x", b"http://evil.example:80/v1/x", b"https://169.254.169.254/v1/x",
    b"http://127.0.0.1:1/v1/x",
])
async def test_absolute_form_target_is_served_by_its_path_and_its_authority_never_selects_a_destination(
        sidecar: Sidecar, counting: CountingUpstream, target: bytes) -> None:
    """RFC 9112 §3.2.2: a server accepts absolute-form; only the configured upstream is ever contacted."""
    request = b"GET " + target + b" HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    status, _, body = await _send(sidecar.port("main"), request)
    assert (status, body) == (200, b"ok")
    assert counting.connections == 1 and counting.targets == [b"/v1/x"]


async def test_absolute_form_with_dot_segments_is_still_refused(sidecar: Sidecar,
                                                                counting: CountingUpstream) -> None:
    request = b"GET http://evil.example/v1/../admin HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
    await _assert_refused(sidecar, counting, request, 400, "bad_request")


async def test_connect_is_405_and_no_upstream_connection_is_opened(sidecar: Sidecar,
                                                                   counting: CountingUpstream) -> None:
    request = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nConnection: close\r\n\r\n"
    await _assert_refused(sidecar, counting, request, 405, "method_not_allowed")


async def test_asterisk_form_target_is_400(sidecar: Sidecar, counting: CountingUpstream) -> None:
    await _assert_refused(sidecar, counting, b"OPTIONS * HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
                          400, "bad_request")


@pytest.mark.parametrize("path", [
    b"/v1/../admin", b"/v1/a/..", b"/v1/./x", b"/v1/%2e%2e/admin", b"/v1/%2E./admin", b"/v1%2f..%2fadmin",
    b"/v1/a%5c..%5cadmin", b"/v1/..?q=1",
])
async def test_dot_segment_path_is_400_and_no_upstream_connection_is_opened(
        sidecar: Sidecar, counting: CountingUpstream, path: bytes) -> None:
    request = b"GET " + path + b" HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
    await _assert_refused(sidecar, counting, request, 400, "bad_request")


@pytest.mark.parametrize("path", [
    b"/v1/a/..;/admin", b"/v1/a/%2e%2e;/admin", b"/v1/a/.;/x", b"/v1/..;jsessionid=1/admin", b"/v1/a/..%3b/admin",
])
async def test_dot_segment_with_path_parameter_is_refused_like_a_dot_segment(
        sidecar: Sidecar, counting: CountingUpstream, path: bytes) -> None:
    """Tomcat, Jetty and Spring resolve '..;' as '..': it must not get past the dot-segment refusal."""
    request = b"GET " + path + b" HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
    await _assert_refused(sidecar, counting, request, 400, "bad_request")


async def test_path_matching_no_route_is_404_and_no_upstream_connection_is_opened(
        sidecar: Sidecar, counting: CountingUpstream) -> None:
    request = b"GET /admin/secrets HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
    await _assert_refused(sidecar, counting, request, 404, "no_route")


async def test_dots_inside_segment_names_are_ordinary_paths(sidecar: Sidecar, counting: CountingUpstream) -> None:
    status, _, _ = await _send(sidecar.port("main"),
                               b"GET /v1/file.tar.gz/..hidden/v1.2 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    assert status == 200
    assert counting.targets == [b"/v1/file.tar.gz/..hidden/v1.2"]


async def test_host_header_naming_another_host_still_goes_only_to_the_configured_upstream(
        sidecar: Sidecar, counting: CountingUpstream) -> None:
    status, _, _ = await _send(sidecar.port("main"),
                               b"GET /v1/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
    assert status == 200
    assert counting.connections == 1 and counting.targets == [b"/v1/x"]
