"""The lean upstream client (``proxy.upstream.connection``) against raw loopback servers.

Each upstream here is a few lines of ``asyncio.start_server`` that writes exact
bytes, so framing, keep-alive and failure cases are under the test's control.
The sidecar-level behaviour (status codes, metrics, aborts) is covered by the
core, streaming and upstream-fault suites; these pin down the client itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy import errors
from proxy.upstream import connection as h1client
from proxy.upstream.connection import StaleConnection
from proxy.upstream.pool import H1Pool
from proxy.upstream.response import (
    H1Response,
    InvalidResponse,
    UpstreamBodyError,
    UpstreamBodyProtocolError,
    UpstreamBodyTimeout,
)

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.connections = 0
        self.closed = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


# The `raw` fixture: (behaviour, *, max_connections, idle_timeout_s) -> a started server and a pool to it.
RawFactory = Callable[..., Awaitable[tuple[RawServer, H1Pool]]]


@pytest.fixture
async def raw() -> AsyncIterator[RawFactory]:
    servers: list[RawServer] = []
    pools: list[H1Pool] = []

    async def make(behaviour: Behaviour, *, max_connections: int = 10,
                   idle_timeout_s: float = 5.0) -> tuple[RawServer, H1Pool]:
        server = RawServer(behaviour)
        port = await server.start()
        pool = H1Pool("svc", "127.0.0.1", port, ssl_context=None, server_hostname=None,
                      max_connections=max_connections, idle_timeout_s=idle_timeout_s)
        servers.append(server)
        pools.append(pool)
        return server, pool

    yield make
    for pool in pools:
        await pool.close()
    for server in servers:
        await server.stop()


async def get(pool: H1Pool, method: str = "GET", body: bytes | AsyncIterator[bytes] | None = None,
              *, chunked: bool = False, idle_s: float | None = 5.0) -> H1Response:
    conn = await pool.acquire(1.0)
    head = f"{method} /x HTTP/1.1\r\nHost: svc\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else ""
    head += f"Content-Length: {len(body)}\r\n" if isinstance(body, bytes) else ""
    return await conn.request((head + "\r\n").encode(), body, chunked=chunked, head_request=method == "HEAD",
                              idle_s=idle_s)


async def body_of(response: H1Response) -> bytes:
    out = b""
    while chunk := await response.read():
        out += chunk
    response.release()
    return out


def stalls_after(reply: bytes) -> Behaviour:
    """Answer the first request with ``reply`` and then send nothing more (the connection stays open)."""
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(5)
    return behaviour


def keep_alive(reply: bytes) -> Behaviour:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
    return behaviour


async def test_keep_alive_connection_is_reused_for_sequential_requests(raw: RawFactory) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    server, pool = await raw(behaviour)
    for _ in range(3):
        response = await get(pool)
        assert (response.status, response.reason, await body_of(response)) == (200, "OK", b"ok")
    assert server.connections == 1


async def test_max_connections_makes_a_second_caller_wait_for_the_first_connection(raw: RawFactory) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.02)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!")
            await writer.drain()

    async def one() -> bytes:
        return await body_of(await get(pool))

    server, pool = await raw(behaviour, max_connections=1)
    assert list(await asyncio.wait_for(asyncio.gather(one(), one(), one()), 5)) == [b"!", b"!", b"!"]
    assert server.connections == 1


async def test_idle_pooled_connection_is_closed_after_idle_timeout(raw: RawFactory) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await reader.read()  # EOF when the pool closes it

    server, pool = await raw(behaviour, idle_timeout_s=0.05)
    await body_of(await get(pool))
    await asyncio.sleep(0.3)
    assert server.closed == 1


async def test_chunked_response_is_decoded(raw: RawFactory) -> None:
    _, pool = await raw(keep_alive(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"))
    assert await body_of(await get(pool)) == b"abcde"


async def test_close_delimited_body_ends_at_eof_and_the_connection_is_not_reused(raw: RawFactory) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()

    server, pool = await raw(behaviour)
    assert await body_of(await get(pool)) == b"until the end"
    assert await body_of(await get(pool)) == b"until the end"
    assert server.connections == 2


async def test_head_response_has_no_body_and_the_connection_stays_usable(raw: RawFactory) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await writer.drain()

    server, pool = await raw(behaviour)
    head = await get(pool, "HEAD")
    assert head.headers["Content-Length"] == "5" and await body_of(head) == b""
    assert await body_of(await get(pool)) == b"hello"
    assert server.connections == 1


async def test_interim_100_continue_is_skipped(raw: RawFactory) -> None:
    _, pool = await raw(keep_alive(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx"))
    response = await get(pool, "POST", b"data")
    assert (response.status, await body_of(response)) == (201, b"x")


async def test_204_and_304_have_no_body_and_keep_the_connection(raw: RawFactory) -> None:
    _, pool = await raw(keep_alive(b"HTTP/1.1 204 No Content\r\n\r\n"))
    for _ in range(2):
        response = await get(pool)
        assert (response.status, await body_of(response)) == (204, b"")


async def test_streamed_request_body_is_sent_chunked(raw: RawFactory) -> None:
    received = asyncio.get_running_loop().create_future()

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        received.set_result(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async def stream() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cde"

    _, pool = await raw(behaviour)
    await body_of(await get(pool, "POST", stream(), chunked=True))
    assert await received == b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"


async def test_stalled_body_fails_the_read_with_an_upstream_timeout(raw: RawFactory) -> None:
    _, pool = await raw(stalls_after(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"))
    response = await get(pool, idle_s=0.05)
    assert await response.read() == b"abc"
    with pytest.raises(UpstreamBodyTimeout) as caught:
        await response.read()
    assert caught.value.code == "upstream_timeout"
    response.close()


async def test_body_cut_short_is_an_upstream_reset_without_a_parse_cause(raw: RawFactory) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()

    _, pool = await raw(behaviour)
    response = await get(pool)
    with pytest.raises(UpstreamBodyError) as caught:
        await body_of(response)
    assert caught.value.code == "upstream_reset"
    assert not isinstance(caught.value, UpstreamBodyProtocolError)
    assert not isinstance(caught.value.__cause__, InvalidResponse)
    response.close()


async def test_invalid_chunk_framing_is_an_upstream_protocol_error(raw: RawFactory) -> None:
    _, pool = await raw(stalls_after(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"))
    response = await get(pool)
    with pytest.raises(UpstreamBodyProtocolError) as caught:
        await body_of(response)
    assert caught.value.code == "upstream_protocol_error"
    response.close()


async def test_garbage_instead_of_a_head_is_an_upstream_protocol_error(raw: RawFactory) -> None:
    _, pool = await raw(stalls_after(b"SSH-2.0-OpenSSH_9.6\r\n"))
    with pytest.raises(errors.UpstreamProtocolError):
        await get(pool)


async def test_close_before_the_head_is_an_upstream_reset(raw: RawFactory) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    _, pool = await raw(behaviour)
    with pytest.raises(errors.UpstreamReset) as info:
        await get(pool)
    assert not isinstance(info.value, StaleConnection)  # a new connection is never stale


async def _close_on_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")  # the keep-alive timeout fires as the next request arrives


async def test_reused_connection_idle_past_the_threshold_closed_before_any_response_byte_is_stale(  # type: ignore[no-untyped-def]
        raw, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h1client, "STALE_IDLE_S", 0.05)
    server, pool = await raw(_close_on_second)
    assert await body_of(await get(pool)) == b"ok"
    await asyncio.sleep(0.1)  # idle in the pool, as a connection whose keep-alive timeout can fire
    with pytest.raises(StaleConnection):
        await get(pool)
    assert server.connections == 1


async def test_reused_connection_busy_moments_ago_closed_before_any_response_byte_is_a_plain_reset(
        raw: RawFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No keep-alive timeout fires on a connection just used: the upstream had the request, so no resend."""
    monkeypatch.setattr(h1client, "STALE_IDLE_S", 5.0)
    _server, pool = await raw(_close_on_second)
    assert await body_of(await get(pool)) == b"ok"
    with pytest.raises(errors.UpstreamReset) as info:
        await get(pool)
    assert not isinstance(info.value, StaleConnection)


async def test_a_complete_response_released_unread_leaves_its_connection_reusable(raw: RawFactory) -> None:
    """A retried 503's body is never read: its connection still goes back to the pool."""
    server, pool = await raw(keep_alive(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"))
    for _ in range(3):
        response = await get(pool)
        assert response.status == 503
        await asyncio.sleep(0.01)  # the body arrives
        assert response.complete
        response.release()
    assert server.connections == 1


async def test_a_released_response_whose_last_read_paused_the_transport_leaves_it_reading(raw: RawFactory) -> None:
    """A body over the 256 KiB buffer that arrives whole pauses reading; the pooled connection must resume."""
    big = b"x" * 300_000
    server, pool = await raw(keep_alive(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n%b"
                                        % (len(big), big)))
    for _ in range(3):
        response = await get(pool)
        deadline = asyncio.get_running_loop().time() + 2
        while not response.complete:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
            if not response.complete:
                # The reads split so that the buffer passed its high-water mark before the end
                # arrived: reading paused, as it should. Take a chunk so the rest can come in.
                await response.read()
        response.release()  # the rest unread, as a retried response's is
    assert server.connections == 1  # each next request on the same connection got its answer


async def test_a_fresh_connection_at_the_limit_closes_the_oldest_idle_one_to_make_room(raw: RawFactory) -> None:
    server, pool = await raw(keep_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), max_connections=1)
    assert await body_of(await get(pool)) == b"ok"  # one idle connection: the pool is at its limit
    conn = await asyncio.wait_for(pool.acquire(1.0, fresh=True), 2)
    assert conn.requests == 0  # a new connection, not the idle one
    await asyncio.sleep(0.05)
    assert server.connections == 2 and server.closed == 1


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate", "chunked, chunked"])
async def test_transfer_coding_other_than_chunked_is_an_upstream_protocol_error(raw: RawFactory, coding: str) -> None:
    reply = f"HTTP/1.1 200 OK\r\nTransfer-Encoding: {coding}\r\n\r\n2\r\nok\r\n0\r\n\r\n".encode()
    _, pool = await raw(keep_alive(reply))
    with pytest.raises(errors.UpstreamProtocolError):
        await get(pool)


async def test_refused_connection_is_an_upstream_connect_failure_that_was_not_sent() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = H1Pool("svc", "127.0.0.1", port, ssl_context=None, server_hostname=None, max_connections=1,
                  idle_timeout_s=1.0)
    with pytest.raises(errors.UpstreamConnectFailure) as caught:
        await pool.acquire(1.0)
    assert caught.value.sent is False
    await pool.close()


async def test_header_field_over_8190_bytes_is_an_upstream_protocol_error(raw: RawFactory) -> None:
    _, pool = await raw(keep_alive(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 0\r\n\r\n"))
    with pytest.raises(errors.UpstreamProtocolError):
        await get(pool)


async def test_head_that_never_ends_is_cut_off_as_an_upstream_protocol_error(raw: RawFactory) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(400):
            writer.write(b"a" * 8192)
            await writer.drain()
        await asyncio.sleep(5)

    _, pool = await raw(behaviour)
    with pytest.raises(errors.UpstreamProtocolError):
        await get(pool)


async def test_utf8_header_values_and_reason_come_through_unchanged(raw: RawFactory) -> None:
    _, pool = await raw(keep_alive("HTTP/1.1 200 Très bien\r\nX-Name: Zoë\r\nContent-Length: 0\r\n\r\n".encode()))
    response = await get(pool)
    assert (response.reason, response.headers["X-Name"]) == ("Très bien", "Zoë")
    await body_of(response)


async def test_bytes_past_the_response_are_excess_even_when_parsed_while_an_exception_is_handled(
        raw: RawFactory, caplog: pytest.LogCaptureFixture) -> None:
    """The parser callback's stop is read from the connection, not from the error's ``__context__``.

    Raising the parser's error while another exception is being handled (as compiled code can
    leave one set) replaces that ``__context__``: the excess then went unnoticed and the
    connection, with a forged response waiting in it, went back to the pool.
    """
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(5)  # the test feeds the answer itself

    _, pool = await raw(silent)
    conn = await pool.acquire(1.0)
    pending = asyncio.ensure_future(conn.request(b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n", None, chunked=False,
                                                 head_request=False, idle_s=5.0))
    await asyncio.sleep(0.05)
    try:
        raise RuntimeError("being handled")
    except RuntimeError:
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                           b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
    response = await pending
    assert await body_of(response) == b"ok"  # the response itself is whole and good
    assert not conn.alive  # never pooled
    assert any("more data than specified" in r.getMessage() for r in caplog.records)
