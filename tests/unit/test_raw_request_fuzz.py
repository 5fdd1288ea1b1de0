"""Fuzz the listener with raw request bytes: always an HTTP response or a clean close, never a crash.

One real sidecar (in-process, on loopback) serves every example.  Examples
mix pure noise with near-valid requests (a real request line and headers with
one part mutated), which reach deeper into the parser.  After each example a
well-formed request on a new connection must still succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.lifecycle.sidecar import Sidecar
from tests.support.sidecar import base_config, start_sidecar
from tests.support.upstream import ScriptedUpstream

# Answer or close within this: header_read_timeout (300ms here) bounds a stalled head, and the
# route's total timeout (1s here) bounds a head whose promised body never comes.
BOUND_S = 2.0
QUIET_S = 0.2
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9]{2} ")

_token = st.text(alphabet=st.sampled_from("abcxyzABC-_!#%&'*+.^`|~0123456789"), min_size=1, max_size=12)
_bytes_field = st.binary(max_size=40)
_line = st.one_of(
    st.builds(lambda n, v: n.encode() + b": " + v, _token, _bytes_field),
    st.sampled_from([b"Content-Length: 5", b"Content-Length: -1", b"Transfer-Encoding: chunked",
                     b"Transfer-Encoding: gzip, chunked", b"Content-Length: 99999999999999999999",
                     b" folded", b"\tfolded", b"Host: other", b"Expect: 100-continue", b"Upgrade: websocket",
                     b"Connection: Upgrade", b"x-outrigger-timeout-ms: NaN", b"x-outrigger-max-attempts: -1",
                     b"traceparent: 00-zz", b"x-request-id: \xff\xfe", b":", b"", b"\x00"]),
    _bytes_field,
)
_request_line = st.builds(
    lambda m, t, v: m + b" " + t + b" " + v,
    st.sampled_from([b"GET", b"POST", b"PUT", b"CONNECT", b"PRI", b"get", b"G\x00T", b""]),
    st.one_of(st.sampled_from([b"/", b"/x?y=1", b"*", b"http://evil/", b"/%00", b"/..", b"//"]), _bytes_field),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 ", b"http/1.1", b""]),
)
_eol = st.sampled_from([b"\r\n", b"\n", b"\r"])
_near_valid = st.builds(
    lambda rl, lines, eol, body: rl + eol + b"".join(line + eol for line in lines) + eol + body,
    _request_line, st.lists(_line, max_size=8), _eol, st.binary(max_size=64),
)
RAW = st.one_of(st.binary(min_size=1, max_size=512), _near_valid,
                st.lists(_near_valid, min_size=2, max_size=3).map(b"".join))


@pytest.fixture(scope="module")
def loop_and_sidecar() -> Iterator[tuple[asyncio.AbstractEventLoop, Sidecar]]:
    loop = asyncio.new_event_loop()
    upstream = ScriptedUpstream()
    loop.run_until_complete(upstream.start())
    data = base_config(upstream.url)
    data["limits"] = {"header_read_timeout": "300ms", "max_body_bytes": "1KiB"}
    data["defaults"]["timeout"] = {"connect": "1s", "attempt": "1s", "total": "1s", "idle": "1s"}
    sidecar = loop.run_until_complete(start_sidecar(data))
    yield loop, sidecar
    loop.run_until_complete(sidecar.stop())
    loop.run_until_complete(upstream.stop())
    loop.close()


async def _send(port: int, raw: bytes) -> bytes:
    """Send ``raw``; what came back by the time the sidecar closed, or went quiet after a response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        writer.write(raw)  # no half-close: aiohttp closes at once on EOF, which would prove nothing
        with contextlib.suppress(ConnectionError):
            while True:
                # An incomplete head is closed after header_read_timeout; a complete keep-alive
                # response is followed by silence, which ends the read after QUIET_S.
                wait = QUIET_S if received else BOUND_S
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), wait)
                except TimeoutError:
                    assert received, "neither a response nor a close within the bound"
                    break
                if not chunk:
                    break
                received += chunk
    finally:
        writer.close()
    return received


async def _good(port: int) -> bytes:
    return await _send(port, b"GET /good HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=RAW)
def test_raw_bytes_get_an_http_response_or_a_clean_close_and_the_next_request_succeeds(
        loop_and_sidecar: tuple[asyncio.AbstractEventLoop, Sidecar], raw: bytes) -> None:
    loop, sidecar = loop_and_sidecar
    port = sidecar.port("main")
    received = loop.run_until_complete(asyncio.wait_for(_send(port, raw), 2 * BOUND_S))
    if received:
        assert _STATUS_LINE.match(received), received[:200]
    good = loop.run_until_complete(asyncio.wait_for(_good(port), 2 * BOUND_S))
    assert good.startswith(b"HTTP/1.1 200"), good[:200]
