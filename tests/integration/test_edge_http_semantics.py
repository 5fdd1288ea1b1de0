"""HTTP/1.1 semantics at the edge, each case one deviation a differential test found.

Requests and upstream answers are exact bytes (``tests.support.raw``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proxy.lifecycle.sidecar import Sidecar
from tests.support.raw import RawUpstream, exchange, header, responses
from tests.support.sidecar import base_config

Factory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    server = RawUpstream()
    await server.start()
    yield server
    await server.stop()


async def _sidecar(sidecar_factory: Factory, upstream: RawUpstream) -> int:
    sidecar = await sidecar_factory(base_config(upstream.url))
    return sidecar.port("main")


def _streamed_without_length(upstream: RawUpstream) -> None:
    """The upstream answers with a chunked body that arrives in two reads: its length is unknown at the head."""
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await upstream.read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"6\r\n world\r\n0\r\n\r\n")
            await writer.drain()
    upstream.behaviour = behaviour


async def test_http10_keep_alive_response_of_unknown_length_is_close_delimited(
        raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    """RFC 9112 §6.3: no chunked framing for HTTP/1.0, so the body ends with the connection."""
    _streamed_without_length(raw_upstream)
    port = await _sidecar(sidecar_factory, raw_upstream)
    raw = await exchange(port, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", within_s=3)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert header(head, b"connection") == b"close" and header(head, b"transfer-encoding") is None
    assert body == b"hello world"


async def test_http11_response_of_unknown_length_is_chunked_and_the_connection_stays_open(
        raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    _streamed_without_length(raw_upstream)
    port = await _sidecar(sidecar_factory, raw_upstream)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):
        writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert header(head, b"transfer-encoding") == b"chunked"
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 3)
        assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    writer.close()


def _connection_tasks() -> int:
    """Tasks serving an app connection (``EdgeProtocol._serve``, compiled or not)."""
    return sum(1 for task in asyncio.all_tasks()
               if "EdgeProtocol" in repr(task.get_coro()) and "_serve" in repr(task.get_coro()))


async def test_a_keep_alive_connection_serves_requests_after_idle_gaps_and_leaves_no_task_when_closed(
        raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    """One task serves a connection's requests in turn: it waits between them and ends with the connection."""
    port = await _sidecar(sidecar_factory, raw_upstream)
    assert _connection_tasks() == 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(3):
        await asyncio.sleep(0.05)  # idle between requests: the connection's task waits for the next head
        writer.write(b"GET /r%d HTTP/1.1\r\nHost: app\r\n\r\n" % i)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 200") and await reader.readexactly(2) == b"ok"
    assert _connection_tasks() == 1  # the idle connection's one task
    writer.close()
    await writer.wait_closed()
    for _ in range(100):
        if _connection_tasks() == 0:
            break
        await asyncio.sleep(0.01)
    assert _connection_tasks() == 0
    assert [head.split(b" ")[1] for head in raw_upstream.heads] == [b"/r0", b"/r1", b"/r2"]


async def test_valid_request_followed_in_the_same_read_by_an_unparsable_one_is_answered_first(
        raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    port = await _sidecar(sidecar_factory, raw_upstream)
    raw = await exchange(port, b"GET /first HTTP/1.1\r\nHost: app\r\n\r\nGARBAGE\r\n\r\n")
    (ok_head, ok_body), (bad_head, _) = responses(raw)
    assert ok_head.startswith(b"HTTP/1.1 200") and ok_body == b"ok"
    assert bad_head.startswith(b"HTTP/1.1 400") and header(bad_head, b"x-outrigger-error") == b"bad_request"
    assert header(bad_head, b"connection") == b"close"


async def test_every_valid_pipelined_request_is_answered_in_order(raw_upstream: RawUpstream,
                                                                  sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory({**base_config(raw_upstream.url), "limits": {"max_pipelined": 2}})
    paths = [f"/p{i}".encode() for i in range(6)]
    request = b"".join(b"GET " + p + b" HTTP/1.1\r\nHost: app\r\n\r\n" for p in paths)
    last = b"GET /last HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"
    raw = await exchange(sidecar.port("main"), request + last)
    assert [head.split(b" ")[1] for head, _ in responses(raw)] == [b"200"] * 7
    assert [head.split(b" ")[1] for head in raw_upstream.heads] == [*paths, b"/last"]


@pytest.mark.parametrize("token", [b"h2c", b"foo/1"])
async def test_request_pipelined_behind_an_upgrade_the_upstream_ignores_is_answered(
        raw_upstream: RawUpstream, sidecar_factory: Factory, token: bytes) -> None:
    port = await _sidecar(sidecar_factory, raw_upstream)
    request = (b"GET /a HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: " + token +
               b"\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
               b"GET /b HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    raw = await exchange(port, request)
    assert [(head.split(b" ")[1], body) for head, body in responses(raw)] == [(b"200", b"ok"), (b"200", b"ok")]
    assert header(raw_upstream.heads[0], b"upgrade") == token  # the upstream was asked, and declined
    assert raw_upstream.heads[1].startswith(b"GET /b ")


@pytest.mark.parametrize("method", [b"FOOBAR", b"FROBNICATE", b"X-CUSTOM.1"])
async def test_extension_token_method_is_forwarded(raw_upstream: RawUpstream, sidecar_factory: Factory,
                                                   method: bytes) -> None:
    port = await _sidecar(sidecar_factory, raw_upstream)
    raw = await exchange(port, method + b" /x HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nConnection: close"
                         b"\r\n\r\nabc")
    assert raw.startswith(b"HTTP/1.1 200")
    assert raw_upstream.heads[0].startswith(method + b" /x HTTP/1.1\r\n")


async def test_extension_method_pipelined_after_another_request_is_forwarded(
        raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    port = await _sidecar(sidecar_factory, raw_upstream)
    raw = await exchange(port, b"POST /1 HTTP/1.1\r\nHost: app\r\nContent-Length: 2\r\n\r\nhi"
                               b"FROBNICATE /2 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    assert [head.split(b" ")[1] for head, _ in responses(raw)] == [b"200", b"200"]
    assert raw_upstream.heads[1].startswith(b"FROBNICATE /2 ")


def _early_hints(upstream: RawUpstream) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upstream.read_head(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
    upstream.behaviour = behaviour


async def test_103_early_hints_are_forwarded_to_an_http11_app(raw_upstream: RawUpstream,
                                                               sidecar_factory: Factory) -> None:
    _early_hints(raw_upstream)
    port = await _sidecar(sidecar_factory, raw_upstream)
    raw = await exchange(port, b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    (hints, _), (final, body) = responses(raw)
    assert hints.startswith(b"HTTP/1.1 103 Early Hints") and header(hints, b"link") == b"</style.css>; rel=preload"
    assert final.startswith(b"HTTP/1.1 200") and body == b"ok"


async def test_1xx_is_not_sent_to_an_http10_app(raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    _early_hints(raw_upstream)
    port = await _sidecar(sidecar_factory, raw_upstream)
    raw = await exchange(port, b"GET / HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200") and b" 103 " not in raw


async def test_http_1_2_request_is_served_as_http_1_1(raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    port = await _sidecar(sidecar_factory, raw_upstream)
    raw = await exchange(port, b"GET / HTTP/1.2\r\nHost: app\r\nConnection: close\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("request_bytes", [b"GET / HTTP/1.1\r\nHost: app\r\nBad Name: x\r\n\r\n",
                                           b"GET / HTTP/1.1\r\nHost: app\r\nX-T: \x07\r\n\r\n"])
async def test_error_reply_to_an_http11_app_has_an_http11_status_line(
        raw_upstream: RawUpstream, sidecar_factory: Factory, request_bytes: bytes) -> None:
    port = await _sidecar(sidecar_factory, raw_upstream)
    raw = await exchange(port, request_bytes)
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked", b"identity, chunked"])
async def test_request_transfer_coding_other_than_chunked_is_501_not_implemented(
        raw_upstream: RawUpstream, sidecar_factory: Factory, coding: bytes) -> None:
    port = await _sidecar(sidecar_factory, raw_upstream)
    raw = await exchange(port, b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: " + coding +
                         b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    head = raw.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 501") and header(head, b"x-outrigger-error") == b"not_implemented"
    assert raw_upstream.heads == []


async def test_non_utf8_header_bytes_pass_byte_for_byte_in_both_directions(
        raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw_upstream.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK \xe9t\xe9\r\nContent-Disposition: attachment; filename=\"caf\xe9.txt\"\r\n"
                     b"X-Bytes: \xff\xfe\x80\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
    raw_upstream.behaviour = behaviour
    port = await _sidecar(sidecar_factory, raw_upstream)
    raw = await exchange(port, b"GET / HTTP/1.1\r\nHost: app\r\nX-Name: caf\xe9 \xff\r\nConnection: close\r\n\r\n")
    assert b"\r\nX-Name: caf\xe9 \xff\r\n" in raw_upstream.heads[0]
    assert raw.startswith(b"HTTP/1.1 200 OK \xe9t\xe9\r\n")
    assert b"\r\nContent-Disposition: attachment; filename=\"caf\xe9.txt\"\r\n" in raw
    assert b"\r\nX-Bytes: \xff\xfe\x80\r\n" in raw


async def test_head_and_204_responses_carry_no_body_and_the_connection_stays_usable(
        raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await raw_upstream.read_head(reader)
            if head.startswith(b"HEAD "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            elif head.startswith(b"DELETE "):
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    raw_upstream.behaviour = behaviour
    port = await _sidecar(sidecar_factory, raw_upstream)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HEAD /h HTTP/1.1\r\nHost: app\r\n\r\nDELETE /d HTTP/1.1\r\nHost: app\r\n\r\n"
                 b"GET /g HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    head_answer, rest = raw.split(b"\r\n\r\n", 1)
    assert head_answer.startswith(b"HTTP/1.1 200") and header(head_answer, b"content-length") == b"10"
    no_content, rest = rest.split(b"\r\n\r\n", 1)
    assert no_content.startswith(b"HTTP/1.1 204") and header(no_content, b"content-length") is None
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"\r\n\r\nok")


async def test_error_reply_to_head_has_its_length_but_no_body(raw_upstream: RawUpstream,
                                                               sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(base_config(raw_upstream.url, match={"path_prefix": "/v1"}))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    writer.write(b"HEAD /nope HTTP/1.1\r\nHost: app\r\n\r\n"
                 b"GET /v1/x HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    refused, ok = raw.split(b"\r\n\r\n", 1)
    assert refused.startswith(b"HTTP/1.1 404") and int(header(refused, b"content-length") or 0) > 0
    assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"\r\n\r\nok")


async def _head_when_upstream_sends(sidecar_factory: Factory, raw_upstream: RawUpstream, fields: bytes) -> bytes:
    """The response head the app gets when the upstream answers 200 with ``fields``."""
    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await raw_upstream.read_head(reader):
            writer.write(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok")
            await writer.drain()
    raw_upstream.behaviour = behaviour
    port = await _sidecar(sidecar_factory, raw_upstream)
    raw = await exchange(port, b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    return raw.partition(b"\r\n\r\n")[0]


@pytest.mark.parametrize("fields, first_lines", [
    # No layer reads these headers, so the edge writes the fields as received (chain.FieldList).
    (b"Set-Cookie: a=1\r\nX-MiXed-Case: v\r\nConnection: keep-alive\r\nset-cookie: b=2\r\n",
     b"Set-Cookie: a=1\r\nX-MiXed-Case: v\r\nset-cookie: b=2\r\n"),
    # A forged x-outrigger-* field makes the upstream call read (and strip) the headers: the edge
    # then writes the decoded mapping, with the same bytes for every other field.
    (b"Set-Cookie: a=1\r\nX-Outrigger-Attempts: 99\r\nX-MiXed-Case: caf\xe9\r\nset-cookie: b=2\r\n",
     b"Set-Cookie: a=1\r\nX-MiXed-Case: caf\xe9\r\nset-cookie: b=2\r\n"),
], ids=["fields-as-received", "fields-read-by-the-sidecar"])
async def test_response_fields_reach_the_app_as_sent_in_order_with_repeats(
        raw_upstream: RawUpstream, sidecar_factory: Factory, fields: bytes, first_lines: bytes) -> None:
    # Names spelled as sent, repeats and order kept; hop-by-hop fields and the upstream's own
    # x-request-id and x-outrigger-* dropped, the edge's own written after them.
    head = await _head_when_upstream_sends(sidecar_factory, raw_upstream, (
        fields + b"Keep-Alive: timeout=5\r\nX-Request-Id: upstreams-own\r\n"))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n" + first_lines + b"Content-Length: 2\r\n")
    assert b"Keep-Alive" not in head and b"upstreams-own" not in head
    assert header(head, b"connection") == b"close"  # the edge's own, for this client
    assert len(header(head, b"x-request-id") or b"") == 32
    assert header(head, b"x-outrigger-attempts") == b"1"
