"""Bad input from the app side: a clear error, nothing echoed, the listener keeps serving everyone else.

Requests are exact bytes on a raw socket (HTTP clients refuse to send most
of them).  Every case also runs a well-formed request on another connection
at the same time, which must succeed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.lifecycle.sidecar import Sidecar
from tests.support.sidecar import base_config
from tests.support.upstream import Echo, Reply, ScriptedUpstream

Factory = Callable[..., Awaitable[Sidecar]]
SECRET = b"s3cr3t-token-value"  # planted in bad requests: it must never come back
GOOD = b"GET /good HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"


def _config(url: str, limits: dict[str, Any] | None = None, **route: Any) -> dict[str, Any]:
    data = base_config(url, **route)
    data["limits"] = {"header_read_timeout": "300ms", **(limits or {})}
    return data


async def _exchange(port: int, request: bytes, within_s: float = 5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within_s)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


async def _refused_while_others_are_served(sidecar: Sidecar, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` and, concurrently, a good request on another connection."""
    port = sidecar.port("main")
    bad, good = await asyncio.gather(_exchange(port, request), _exchange(port, GOOD))
    assert _parse(good)[0] == 200
    assert SECRET not in bad
    status, headers, body = _parse(bad)  # _exchange read to EOF: the sidecar closed the connection after it
    assert json.loads(body)["error"] == headers["x-outrigger-error"]
    # ...and afterwards too.
    assert _parse(await _exchange(port, GOOD))[0] == 200
    return status, headers, body


MALFORMED = {
    "garbage-request-line": b"GARBAGE " + SECRET + b"\r\n\r\n",
    "invalid-method": b"G@T / HTTP/1.1\r\nHost: app\r\n\r\n",
    "invalid-version": b"GET / HTTP/7.1\r\nHost: app\r\n\r\n",
    "space-in-target": b"GET /a " + SECRET + b" HTTP/1.1\r\nHost: app\r\n\r\n",
    "http-0.9": b"GET /" + SECRET + b"\r\n\r\n",
    "lf-only-line-endings": b"GET / HTTP/1.1\nHost: app\n\n",
    "tls-on-plain-port": bytes.fromhex("160301") + b"\x00\x05" + SECRET,
    "space-in-header-name": b"GET / HTTP/1.1\r\nHost: app\r\nBad Name: " + SECRET + b"\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost: app\r\nX-Token : " + SECRET + b"\r\n\r\n",
    "non-token-header-name": b"GET / HTTP/1.1\r\nHost: app\r\nX(y): " + SECRET + b"\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: app\r\nX-Token: " + SECRET + b"\x00x\r\n\r\n",
    "control-char-in-value": b"GET / HTTP/1.1\r\nHost: app\r\nX-Token: " + SECRET + b"\x07\r\n\r\n",
    "bare-cr-in-value": b"GET / HTTP/1.1\r\nHost: app\r\nX-Token: " + SECRET + b"\rInjected: 1\r\n\r\n",
    "bare-lf-in-value": b"GET / HTTP/1.1\r\nHost: app\r\nX-Token: " + SECRET + b"\nInjected: 1\r\n\r\n",
    "missing-host-1.1": b"GET / HTTP/1.1\r\nX-Token: " + SECRET + b"\r\n\r\n",
    "duplicate-host": b"GET / HTTP/1.1\r\nHost: app\r\nHost: " + SECRET + b"\r\n\r\n",
    "content-length-and-transfer-encoding":
        b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding-and-content-length":
        b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "duplicate-content-length-same":
        b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "duplicate-content-length-differ":
        b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
    "content-length-list": b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 3, 3\r\n\r\nabc",
    "content-length-signed": b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: +3\r\n\r\nabc",
    "transfer-encoding-not-chunked-last": b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "transfer-encoding-unknown": b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "transfer-encoding-twice":
        b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obsolete-line-folding-space": b"GET / HTTP/1.1\r\nHost: app\r\nX-Token: a\r\n " + SECRET + b"\r\n\r\n",
    "obsolete-line-folding-tab": b"GET / HTTP/1.1\r\nHost: app\r\nX-Token: a\r\n\t" + SECRET + b"\r\n\r\n",
    "whitespace-before-first-header": b"GET / HTTP/1.1\r\n Host: app\r\n\r\n",
    "invalid-chunk-size":
        b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + SECRET + b"\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_is_400_bad_request_without_echo(
        upstream: ScriptedUpstream, sidecar_factory: Factory, request_bytes: bytes) -> None:
    sidecar = await sidecar_factory(_config(upstream.url))
    status, headers, body = await _refused_while_others_are_served(sidecar, request_bytes)
    assert (status, headers["x-outrigger-error"]) == (400, "bad_request")
    assert json.loads(body)["message"]  # says what was wrong...
    assert [r.path for r in upstream.requests] == ["/good", "/good"]  # ...and nothing else went upstream


async def test_refused_requests_are_counted_in_the_metrics(upstream: ScriptedUpstream,
                                                           sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(_config(upstream.url))
    for request in (MALFORMED["invalid-method"], MALFORMED["obsolete-line-folding-tab"]):
        await _exchange(sidecar.port("main"), request)
    value = sidecar.metrics.registry.get_sample_value("outrigger_requests_total", {
        "route": "none", "upstream": "none", "method": "_OTHER", "code": "4xx", "outcome": "bad_request"})
    assert value == 2


# --- size limits ---


def _headers(count: int, size: int) -> bytes:
    return b"".join(b"X-F%d: %s\r\n" % (i, SECRET + b"v" * (size - len(SECRET))) for i in range(count))


HEADS_TOO_LARGE = {
    "one-field-over-max-header-bytes": b"GET / HTTP/1.1\r\nHost: app\r\n" + _headers(1, 70_000) + b"\r\n",
    "long-header-name": b"GET / HTTP/1.1\r\nHost: app\r\nX-" + b"n" * 70_000 + b": " + SECRET + b"\r\n\r\n",
    "fields-summing-over-max-header-bytes": b"GET / HTTP/1.1\r\nHost: app\r\n" + _headers(80, 1024) + b"\r\n",
    "request-line-over-max-header-bytes": b"GET /" + b"p" * 70_000 + b" HTTP/1.1\r\nHost: app\r\n\r\n",
    "more-than-max-headers": b"GET / HTTP/1.1\r\nHost: app\r\n" + _headers(100, 20) + b"\r\n",
}


@pytest.mark.parametrize("request_bytes", HEADS_TOO_LARGE.values(), ids=HEADS_TOO_LARGE.keys())
async def test_head_over_the_limits_is_431_headers_too_large(
        upstream: ScriptedUpstream, sidecar_factory: Factory, request_bytes: bytes) -> None:
    sidecar = await sidecar_factory(_config(upstream.url))  # defaults: 64 KiB, 100 headers
    status, headers, _ = await _refused_while_others_are_served(sidecar, request_bytes)
    assert (status, headers["x-outrigger-error"]) == (431, "headers_too_large")


async def test_head_just_under_the_limits_is_served(upstream: ScriptedUpstream, sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(_config(upstream.url))
    request = b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n" + _headers(60, 1000) + b"\r\n"
    assert _parse(await _exchange(sidecar.port("main"), request))[0] == 200
    assert len(upstream.requests) == 1


async def test_oversized_head_sent_in_pieces_is_431_before_it_ends(upstream: ScriptedUpstream,
                                                                    sidecar_factory: Factory) -> None:
    """An endless head is refused once it passes the limit, not buffered until it ends."""
    sidecar = await sidecar_factory(_config(upstream.url, {"max_header_bytes": "8KiB", "header_read_timeout": "5s"}))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n")
    answer = b""
    for i in range(200):
        writer.write(b"X-F%d: %s\r\n" % (i, b"v" * 500))
        try:
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.002)
        if answer := await _read_if_any(reader):
            break
    answer += await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert _parse(answer)[0] == 431
    assert i < 30  # refused at about 8 KiB, long before the 100 KB head ended


async def _read_if_any(reader: asyncio.StreamReader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(65536), 0.001)
    except TimeoutError:
        return b""


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("retry", [3, 1], ids=["buffered-for-retry", "streamed"])
async def test_body_over_max_body_bytes_is_413(upstream: ScriptedUpstream, sidecar_factory: Factory, framing: str,
                                               retry: int) -> None:
    upstream.default = Echo()
    sidecar = await sidecar_factory(_config(upstream.url, {"max_body_bytes": "1KiB"},
                                            retry={"max_attempts": retry, "buffer_limit": "512B"}))
    body = b"b" * 4096
    if framing == "chunked":
        framed = b"".join(b"%x\r\n%s\r\n" % (256, body[i:i + 256]) for i in range(0, len(body), 256)) + b"0\r\n\r\n"
        request = b"POST / HTTP/1.1\r\nHost: app\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n" + framed
    else:
        request = b"POST / HTTP/1.1\r\nHost: app\r\nConnection: close\r\nContent-Length: 4096\r\n\r\n" + body
    raw = await _exchange(sidecar.port("main"), request)
    status, headers, _ = _parse(raw)
    assert (status, headers["x-outrigger-error"]) == (413, "request_too_large")
    # A body within the limit still goes through, on a fresh connection.
    ok = await _exchange(sidecar.port("main"),
                         b"POST / HTTP/1.1\r\nHost: app\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello")
    assert _parse(ok)[0] == 200 and ok.endswith(b"hello")


# --- slowloris: limits.header_read_timeout (300ms here) ---


async def _closed_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trickle: bytes | None,
                        within: float) -> float:
    """Trickle ``trickle`` a byte every 50ms (or send nothing); seconds until the sidecar closed the connection."""
    started = time.monotonic()
    index = 0
    while time.monotonic() - started < within:
        if trickle is not None and index < len(trickle):
            writer.write(trickle[index:index + 1])
            index += 1
        try:
            data = await asyncio.wait_for(reader.read(65536), 0.05)
        except TimeoutError:
            continue
        except ConnectionError:
            return time.monotonic() - started
        if not data:  # EOF: closed without a response
            return time.monotonic() - started
        raise AssertionError(f"unexpected response to a trickled head: {data[:100]!r}")
    raise AssertionError("the connection was not closed")


@pytest.mark.parametrize("trickle", [b"GET /slow HTTP/1.1\r\nHost: app\r\nX-Pad: " + b"p" * 200, None],
                         ids=["head-trickled", "nothing-sent"])
async def test_head_not_complete_within_header_read_timeout_closes_the_connection(
        upstream: ScriptedUpstream, sidecar_factory: Factory, trickle: bytes | None) -> None:
    upstream.default = Reply(body=b"fine")
    sidecar = await sidecar_factory(_config(upstream.url))
    port = sidecar.port("main")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    closed_after, good = await asyncio.gather(_closed_after(reader, writer, trickle, within=3),
                                              _exchange(port, GOOD))
    writer.close()
    assert 0.25 <= closed_after < 1.0
    assert _parse(good)[0] == 200
    assert upstream.requests[0].path == "/good" and len(upstream.requests) == 1  # the slow head never went up
    value = sidecar.metrics.registry.get_sample_value("outrigger_requests_total", {
        "route": "none", "upstream": "none", "method": "_OTHER", "code": "4xx", "outcome": "header_timeout"})
    assert value == 1


async def test_slowloris_on_a_keep_alive_connection_after_a_request_is_closed(
        upstream: ScriptedUpstream, sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(_config(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    writer.write(b"GET /first HTTP/1.1\r\nHost: app\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    await reader.readexactly(2)
    closed_after = await _closed_after(reader, writer, b"GET /second HTTP/1.1\r\nHost: app\r\nX-Pad: " + b"p" * 100,
                                       within=3)
    writer.close()
    assert 0.25 <= closed_after < 1.0


async def test_idle_keep_alive_connection_outlives_header_read_timeout(
        upstream: ScriptedUpstream, sidecar_factory: Factory) -> None:
    """Only a started head is timed: an idle pooled connection is not closed by this limit."""
    sidecar = await sidecar_factory(_config(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    for path in (b"/one", b"/two"):
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: app\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readexactly(2)
        await asyncio.sleep(0.6)  # twice the header read timeout, idle
    # A head arriving in pieces, each well within the timeout, is fine too.
    for piece in (b"GET /three HT", b"TP/1.1\r\nHost: a", b"pp\r\n\r\n"):
        writer.write(piece)
        await asyncio.sleep(0.08)
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()
    assert [r.path for r in upstream.requests] == ["/one", "/two", "/three"]
