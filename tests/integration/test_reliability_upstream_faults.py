"""Upstream faults: each ends with its documented x-outrigger-error code and metric, never a hang.

The misbehaving upstreams are raw asyncio servers writing exact bytes (or a
TCP RST), because an HTTP server library would refuse to produce most of
these responses.  Retries are off (``max_attempts: 1``) so each request makes
exactly one attempt and every counter below is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.lifecycle.sidecar import Sidecar
from proxy.upstream import connection as h1client
from tests.integration.test_core_tls import certs, https_url  # noqa: F401 - fixtures
from tests.support.ports import free_port
from tests.support.sidecar import base_config

Factory = Callable[..., Awaitable[Sidecar]]
Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
# No fault may take longer than this to surface (the attempt timeout is 1s, idle 0.5s).
BOUND_S = 3.0


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _read_head(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


class RawUpstream:
    """A TCP server that answers every request with ``behaviour``; counts connections."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._stall = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self.behaviour(reader, writer)

    async def stall(self) -> None:
        await self._stall.wait()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self._stall.set()
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Behaviour], Awaitable[RawUpstream]]]:
    made: list[RawUpstream] = []

    async def make(behaviour: Behaviour) -> RawUpstream:
        upstream = RawUpstream(behaviour)
        made.append(upstream)
        await upstream.start()
        return upstream

    yield make
    for upstream in made:
        await upstream.stop()


def _config(url: str, **route: Any) -> dict[str, Any]:
    route.setdefault("retry", {"max_attempts": 1})
    route.setdefault("timeout", {"connect": "1s", "attempt": "1s", "total": "2s", "idle": "500ms"})
    return base_config(url, **route)


def _sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    return sidecar.metrics.registry.get_sample_value(name, labels) or 0.0


def _requests(sidecar: Sidecar, outcome: str) -> float:
    return _sample(sidecar, "outrigger_requests_total", route="default", upstream="svc", method="GET",
                   code="5xx" if outcome != "upstream" else "2xx", outcome=outcome)


def _attempts(sidecar: Sidecar, result: str) -> float:
    return _sample(sidecar, "outrigger_upstream_attempts_total", route="default", upstream="svc", result=result)


async def _get(sidecar: Sidecar) -> tuple[int, str | None, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{sidecar.port('main')}/fault") as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-outrigger-error"), time.monotonic() - started


async def _assert_fault(sidecar: Sidecar, status: int, code: str, result: str) -> None:
    got, error, elapsed = await asyncio.wait_for(_get(sidecar), BOUND_S + 2)
    assert (got, error) == (status, code)
    assert elapsed < BOUND_S
    assert _requests(sidecar, code) == 1
    assert _attempts(sidecar, result) == 1


# --- before response headers: a clean error response ---


async def test_connection_refused_is_503_upstream_connect_failure(sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{free_port()}"))  # nothing listens there
    await _assert_fault(sidecar, 503, "upstream_connect_failure", "connect_failure")


async def test_dns_failure_is_503_upstream_connect_failure(sidecar_factory: Factory) -> None:
    """``.invalid`` never resolves (RFC 6761), so no traffic leaves the host."""
    sidecar = await sidecar_factory(_config("http://outrigger-test.invalid:80"))
    await _assert_fault(sidecar, 503, "upstream_connect_failure", "connect_failure")


async def _message(sidecar: Sidecar) -> str:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{sidecar.port('main')}/fault") as resp:
        body = await resp.json()
        return str(body["message"])


async def test_a_dns_failure_names_the_host_it_tried_to_resolve(sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(_config("http://outrigger-test.invalid:80"))
    assert "'outrigger-test.invalid'" in await _message(sidecar)


async def test_a_refused_connection_names_the_address_it_tried(sidecar_factory: Factory) -> None:
    port = free_port()
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{port}"))
    assert f"127.0.0.1:{port}" in await _message(sidecar)


async def test_reset_before_response_headers_is_502_upstream_reset(
        sidecar_factory: Factory, raw_upstream: Callable[[Behaviour], Awaitable[RawUpstream]]) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        _rst(writer)

    upstream = await raw_upstream(behaviour)
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    await _assert_fault(sidecar, 502, "upstream_reset", "reset")


@pytest.mark.parametrize("partial", [b"HTTP/1.1 20", b"HTTP/1.1 200 OK\r\nContent-Type: text/pl"],
                         ids=["half-status-line", "half-headers"])
async def test_reset_mid_headers_is_502(sidecar_factory: Factory,
                                        raw_upstream: Callable[[Behaviour], Awaitable[RawUpstream]],
                                        partial: bytes) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(partial)
        await writer.drain()
        await asyncio.sleep(0.05)
        _rst(writer)

    upstream = await raw_upstream(behaviour)
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    got, error, elapsed = await _get(sidecar)
    assert got == 502 and error in ("upstream_reset", "upstream_protocol_error")
    assert elapsed < BOUND_S
    assert _requests(sidecar, error) == 1 and _attempts(sidecar, "reset") == 1


@pytest.mark.parametrize("garbage", [
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x00\x01\x02\x03garbage\xff\xfe\r\n\r\n",
    b"HTTP/1.1 abc Nope\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header Name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
], ids=["ssh-banner", "binary", "bad-status", "bad-header", "duplicate-content-length"])
async def test_response_that_is_not_http_is_502_upstream_protocol_error(
        sidecar_factory: Factory, raw_upstream: Callable[[Behaviour], Awaitable[RawUpstream]],
        garbage: bytes) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(garbage)
        await writer.drain()
        await upstream.stall()  # keep the connection open: the error must come from parsing

    upstream = await raw_upstream(behaviour)
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    await _assert_fault(sidecar, 502, "upstream_protocol_error", "reset")


async def test_headers_that_never_finish_are_504_upstream_timeout(
        sidecar_factory: Factory, raw_upstream: Callable[[Behaviour], Awaitable[RawUpstream]]) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        await writer.drain()
        await upstream.stall()

    upstream = await raw_upstream(behaviour)
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    await _assert_fault(sidecar, 504, "upstream_timeout", "timeout")
    assert _sample(sidecar, "outrigger_timeouts_total", route="default", upstream="svc", kind="idle") \
        + _sample(sidecar, "outrigger_timeouts_total", route="default", upstream="svc", kind="attempt") == 1


async def test_certificate_that_does_not_verify_is_502_upstream_tls_error(
        sidecar_factory: Factory, https_url: str) -> None:  # noqa: F811 - fixture
    sidecar = await sidecar_factory(_config(https_url))
    await _assert_fault(sidecar, 502, "upstream_tls_error", "connect_failure")


# --- after response headers: the app's connection is aborted, never a silently short body ---


async def _get_broken(sidecar: Sidecar) -> tuple[int, float]:
    started = time.monotonic()
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{sidecar.port('main')}/fault") as resp:
        status = resp.status
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    return status, time.monotonic() - started


def _broken_requests(sidecar: Sidecar, outcome: str) -> float:
    return _sample(sidecar, "outrigger_requests_total", route="default", upstream="svc", method="GET", code="2xx",
                   outcome=outcome)


async def test_reset_mid_body_aborts_the_app_connection_and_counts_upstream_reset(
        sidecar_factory: Factory, raw_upstream: Callable[[Behaviour], Awaitable[RawUpstream]]) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(0.05)
        _rst(writer)

    upstream = await raw_upstream(behaviour)
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    status, elapsed = await asyncio.wait_for(_get_broken(sidecar), BOUND_S + 2)
    assert status == 200 and elapsed < BOUND_S
    assert _broken_requests(sidecar, "upstream_reset") == 1


async def test_truncated_chunked_body_aborts_the_app_connection(
        sidecar_factory: Factory, raw_upstream: Callable[[Behaviour], Awaitable[RawUpstream]]) -> None:
    """The upstream closes cleanly (FIN) after a chunk, without the terminating 0-size chunk."""
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    upstream = await raw_upstream(behaviour)
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    status, elapsed = await asyncio.wait_for(_get_broken(sidecar), BOUND_S + 2)
    assert status == 200 and elapsed < BOUND_S
    assert _broken_requests(sidecar, "upstream_reset") == 1


async def test_invalid_chunk_framing_mid_body_aborts_and_counts_upstream_protocol_error(
        sidecar_factory: Factory, raw_upstream: Callable[[Behaviour], Awaitable[RawUpstream]]) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.1)  # headers are relayed first; the broken framing arrives mid-body
        writer.write(b"zz\r\nnope\r\n")
        await writer.drain()
        await upstream.stall()

    upstream = await raw_upstream(behaviour)
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    status, elapsed = await asyncio.wait_for(_get_broken(sidecar), BOUND_S + 2)
    assert status == 200 and elapsed < BOUND_S
    assert _broken_requests(sidecar, "upstream_protocol_error") == 1


async def test_stalled_body_aborts_after_the_idle_timeout_and_counts_it(
        sidecar_factory: Factory, raw_upstream: Callable[[Behaviour], Awaitable[RawUpstream]]) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await writer.drain()
        await upstream.stall()

    upstream = await raw_upstream(behaviour)
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    status, elapsed = await asyncio.wait_for(_get_broken(sidecar), BOUND_S + 2)
    assert status == 200
    assert 0.4 < elapsed < BOUND_S  # the 500ms idle timeout, not the 2s total
    assert _broken_requests(sidecar, "upstream_timeout") == 1
    assert _sample(sidecar, "outrigger_timeouts_total", route="default", upstream="svc", kind="idle") == 1


# --- the sidecar survives all of it ---


async def test_sidecar_keeps_serving_after_every_fault(
        sidecar_factory: Factory, raw_upstream: Callable[[Behaviour], Awaitable[RawUpstream]],
        tmp_path: Path) -> None:
    """One sidecar, one upstream cycling through the faults, then a good response."""
    faults = [
        b"HTTP/1.1 20", b"SSH-2.0-x\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
    ]
    served = 0

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await _read_head(reader)
        if served < len(faults):
            writer.write(faults[served])
            served += 1
            await writer.drain()
            _rst(writer)
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    upstream = await raw_upstream(behaviour)
    data = _config(f"http://127.0.0.1:{upstream.port}")
    data["upstreams"]["svc"]["circuit_breaker"] = {"enabled": False}
    sidecar = await sidecar_factory(data)
    async with aiohttp.ClientSession() as session:
        for _ in faults:
            try:
                async with session.get(f"http://127.0.0.1:{sidecar.port('main')}/x") as resp:
                    await resp.read()
            except aiohttp.ClientPayloadError:
                pass
        async with session.get(f"http://127.0.0.1:{sidecar.port('main')}/x") as resp:
            assert (resp.status, await resp.read()) == (200, b"ok")


# --- keep-alive races and connection reuse ---


def _close_on_second_request(close: Callable[[asyncio.StreamWriter], None]) -> Behaviour:
    """Answer one request, then close as the next one arrives without answering it (a keep-alive timeout race)."""
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await writer.drain()
        while True:
            await _read_head(reader)
            close(writer)
            return
    return behaviour


@pytest.mark.parametrize("close", [_rst, lambda writer: writer.close()], ids=["rst", "fin"])
async def test_idempotent_request_on_an_idle_pooled_connection_the_upstream_just_closed_is_resent_once_and_counted(
        raw_upstream: Any, sidecar_factory: Factory, close: Callable[[asyncio.StreamWriter], None],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h1client, "STALE_IDLE_S", 0.05)  # the keep-alive race needs an idle connection
    upstream = await raw_upstream(_close_on_second_request(close))
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    url = f"http://127.0.0.1:{sidecar.port('main')}/fault"
    async with aiohttp.ClientSession() as session:
        for expected_connections in (1, 2, 3):
            async with session.get(url) as resp:  # retries are off: only the stale-connection resend can save it
                assert resp.status == 200, resp.headers.get("x-outrigger-error")
                assert await resp.read() == b"first"
                # the race's failed try is an attempt too
                assert resp.headers["x-outrigger-attempts"] == ("1" if expected_connections == 1 else "2")
            assert upstream.connections == expected_connections
            await asyncio.sleep(0.1)
    assert _attempts(sidecar, "success") == 3
    assert _attempts(sidecar, "reset") == 2
    assert _sample(sidecar, "outrigger_retries_total", route="default", upstream="svc",
                   reason="stale_connection") == 2
    assert _sample(sidecar, "outrigger_retries_total", route="default", upstream="svc", reason="reset") == 0


async def test_a_connection_reused_at_once_that_the_upstream_closes_is_not_resent(
        raw_upstream: Any, sidecar_factory: Factory) -> None:
    """Busy moments ago, it was not closed by a keep-alive timeout: the upstream read the request."""
    upstream = await raw_upstream(_close_on_second_request(_rst))
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    url = f"http://127.0.0.1:{sidecar.port('main')}/fault"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 200
        async with session.get(url) as resp:
            assert (resp.status, resp.headers.get("x-outrigger-error")) == (502, "upstream_reset")
            assert resp.headers["x-outrigger-attempts"] == "1"
    assert upstream.connections == 1


async def test_post_on_a_pooled_connection_the_upstream_just_closed_is_not_resent(
        raw_upstream: Any, sidecar_factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h1client, "STALE_IDLE_S", 0.05)
    upstream = await raw_upstream(_close_on_second_request(_rst))
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    url = f"http://127.0.0.1:{sidecar.port('main')}/fault"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b"pay") as resp:
            assert resp.status == 200
        await asyncio.sleep(0.1)  # idle long enough to be the keep-alive race
        async with session.post(url, data=b"pay") as resp:  # it may have been processed: never sent twice
            assert (resp.status, resp.headers.get("x-outrigger-error")) == (502, "upstream_reset")
    assert upstream.connections == 1


async def test_a_retried_503_leaves_its_connection_in_the_pool_for_the_next_attempt(
        raw_upstream: Any, sidecar_factory: Factory) -> None:
    replies = iter([b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"] * 2
                   + [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await _read_head(reader)
            writer.write(next(replies))
            await writer.drain()

    upstream = await raw_upstream(behaviour)
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}",
                                            retry={"max_attempts": 3, "backoff": {"base": "1ms", "max": "2ms"}}))
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{sidecar.port('main')}/fault") as resp:
        assert resp.status == 200
        assert resp.headers["x-outrigger-attempts"] == "3"
    assert upstream.connections == 1  # all three attempts on one keep-alive connection


async def test_response_headers_are_passed_as_sent_without_a_default_content_type_or_server(
        raw_upstream: Any, sidecar_factory: Factory) -> None:
    upstream = await raw_upstream(_close_on_second_request(_rst))
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{sidecar.port('main')}/fault") as resp:
        assert resp.status == 200 and await resp.read() == b"first"
        assert "Content-Type" not in resp.headers
        assert "Server" not in resp.headers


async def test_a_failed_single_attempt_reports_one_attempt(raw_upstream: Any, sidecar_factory: Factory) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_head(reader)
        _rst(writer)

    upstream = await raw_upstream(reset)
    sidecar = await sidecar_factory(_config(f"http://127.0.0.1:{upstream.port}"))  # max_attempts 1: no retry policy
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{sidecar.port('main')}/fault") as resp:
        assert (resp.status, resp.headers.get("x-outrigger-error")) == (502, "upstream_reset")
        assert resp.headers["x-outrigger-attempts"] == "1"
