"""Bodies at the edge: the app's request body on the way in, the response on the way out.

``IncomingBody`` is fed by the connection's parser (``proxy.edge.protocol``)
and read by the request's task with backpressure: reading from the app
pauses while too much is buffered.  Request bodies up to the route's
``buffer_limit`` are read whole so a retry can resend them; bigger ones
become a buffered prefix plus the rest of the app's stream.  A gap longer
than ``limits.client_idle_timeout`` in the app's upload ends the request with
408 ``client_timeout``; broken chunked framing ends it with 400 at once.

``send_response`` relays the response head and body: head and a complete
small body in one write; otherwise chunk by chunk, honouring the app's
read pace, bounded by ``limits.client_idle_timeout`` when the app stops
reading.  When the upstream breaks off mid-body the app's connection is
aborted, so it sees a broken response rather than a silently short one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from multidict import MultiMapping

from proxy import errors
from proxy.chain import ProxyResponse, RequestBody
from proxy.edge.headers import (
    ATTEMPTS_HEADER,
    CONNECTION,
    HOP_BY_HOP,
    REQUEST_ID_HEADER,
    connection_listed,
    connection_names,
)
from proxy.edge.responses import connection_line, head_bytes, status_line
from proxy.streams import BodyBuffer
from proxy.upstream.response import UpstreamBodyError, UpstreamBodyTimeout

if TYPE_CHECKING:
    from proxy.edge.protocol import EdgeProtocol
    from proxy.edge.request import EdgeRequest

__all__ = ["NO_BODY", "IncomingBody", "Sent", "read_request_body", "send_response"]

log: Final = logging.getLogger("outrigger.server")
NO_BODY: Final = RequestBody(None)  # immutable in practice: payload() of a bodiless request is always None
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_BODYLESS_STATUS: Final = frozenset({204, 304})
# Replaced by the edge's own values; hop-by-hop ones never cross.
_SKIP: Final = HOP_BY_HOP | {REQUEST_ID_HEADER, ATTEMPTS_HEADER}


# Final: mypyc compiles these to constants rather than a lookup in the module's dict per use.
_KEEP: Final = 0  # passed on: _KEEP and _LENGTH (<= _LENGTH)
_LENGTH: Final = 1
_SKIP_IT: Final = 2
_CONNECTION: Final = 3
_CONNECTION_NAME: Final = CONNECTION.lower()
_KINDS: Final[dict[str, int]] = {}  # response header name as the upstream spells it -> what the edge does with it
_RAW_KINDS: Final[dict[bytes, int]] = {}  # the same, for a name as received (bytes); Connection apart
_HARMLESS: Final[dict[bytes, bool]] = {}  # a Connection value as received -> it lists no field the edge passes on
# What the field loops found: a Content-Length among the fields passed on, none, or (the raw
# loop only) a Connection field listing a name to drop, which the decoded loop then handles.
_NO_LENGTH: Final = 0
_HAS_LENGTH: Final = 1
_DECODE: Final = 2


def _kind(name: str) -> int:
    """Classify a header name once (the same few names come back on every response)."""
    lower = name.lower()
    kind = _SKIP_IT if lower in _SKIP or lower.startswith("proxy-") else _LENGTH if lower == "content-length" \
        else _KEEP
    if len(_KINDS) < 4096:  # bounded: an upstream inventing names cannot grow it without end
        _KINDS[name] = kind
    return kind


def _raw_kind(name: bytes) -> int:
    text = name.decode("utf-8", "surrogateescape")
    kind = _CONNECTION if text.lower() == _CONNECTION_NAME else _kind(text)
    if len(_RAW_KINDS) < 4096:
        _RAW_KINDS[name] = kind
    return kind


def _harmless(value: bytes) -> bool:
    """A Connection value listing only names the edge drops anyway (``keep-alive``, the usual one)."""
    harmless = _HARMLESS.get(value)
    if harmless is None:
        names = connection_names(value.decode("utf-8", "surrogateescape"))
        harmless = all(_kind(name) != _KEEP for name in names)
        if len(_HARMLESS) < 256:  # bounded: made-up values cannot grow it without end
            _HARMLESS[value] = harmless
    return harmless


def _raw_fields(fields: list[tuple[bytes, bytes]], parts: list[bytes]) -> int:
    """Append the upstream's fields the app gets to ``parts``, as received (no decoding)."""
    found = _NO_LENGTH
    kinds = _RAW_KINDS
    for name, value in fields:
        kind = kinds.get(name)
        if kind is None:
            kind = _raw_kind(name)
        if kind <= _LENGTH:  # _KEEP or _LENGTH
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
            if kind == _LENGTH:
                found = _HAS_LENGTH
        elif kind == _CONNECTION and not _harmless(value):
            return _DECODE
    return found


def _decoded_fields(headers: MultiMapping[str], parts: list[bytes]) -> int:
    """The same for headers read (or made) as a mapping: a policy's response, or one it looked at."""
    found = _NO_LENGTH
    listed = connection_listed(headers) if CONNECTION in headers else None
    lines: list[str] = []
    kinds = _KINDS
    for name, value in headers.items():
        kind = kinds.get(name)
        if kind is None:
            kind = _kind(name)
        if kind == _KEEP:
            if listed is not None and name.lower() in listed:
                continue
            lines.append(f"{name}: {value}\r\n")
        elif kind == _LENGTH:
            found = _HAS_LENGTH
            lines.append(f"{name}: {value}\r\n")
    parts.append("".join(lines).encode("utf-8", "surrogateescape"))
    return found


class IncomingBody(BodyBuffer):
    """The app's request body as the parser delivers it; read by the request's task."""

    __slots__ = ("_proto", "expect_continue", "received")

    def __init__(self, proto: EdgeProtocol, expect_continue: bool) -> None:
        super().__init__()
        self._proto = proto
        self.expect_continue = expect_continue  # answer 100 Continue on the first read that must wait
        self.received = 0

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        self.expect_continue = False  # the app sent the body without waiting
        super().feed(chunk)

    def _pause(self) -> None:
        self._proto.pause_for_body()

    def _resume(self) -> None:
        self._proto.resume_for_body()

    async def read(self, owner: RequestBody | None = None) -> bytes:
        """The next piece of the body, ``b""`` at its end."""
        while (chunk := self._next_chunk()) is None:
            await self._wait(owner)
        return chunk

    async def _wait(self, owner: RequestBody | None) -> None:
        proto = self._proto
        if self.expect_continue:
            self.expect_continue = False
            proto.write(_CONTINUE)
        waiter = self._waiter = proto.loop.create_future()
        idle = proto.listener.limits.client_idle_s
        timer = proto.loop.call_later(idle, self.fail, errors.ClientTimeout(
            f"the app sent no request body bytes for limits.client_idle_timeout ({idle:g}s)"))
        if owner is not None:
            owner.waiting_on_app = True
        try:
            await waiter
        finally:
            timer.cancel()
            if owner is not None:
                owner.waiting_on_app = False


async def read_request_body(body: IncomingBody, length: int | None, buffer_limit: int,
                            max_body: int | None) -> RequestBody:
    """The request body, buffered up to ``buffer_limit`` (replayable) or streamed beyond it."""
    if max_body is not None and length is not None and length > max_body:
        raise errors.RequestTooLarge(f"request body of {length} bytes exceeds limits.max_body_bytes ({max_body})")
    if length is not None and length > buffer_limit:
        streamed = RequestBody(prefix=b"")
        streamed.stream = _BodyStream(body, streamed, max_body, 0)
        return streamed
    buffered = bytearray()
    while len(buffered) <= buffer_limit:
        chunk = await body.read()
        if not chunk:
            return RequestBody(bytes(buffered))
        buffered += chunk
        if max_body is not None and len(buffered) > max_body:
            raise errors.RequestTooLarge(f"request body exceeds limits.max_body_bytes ({max_body})")
    streamed = RequestBody(prefix=bytes(buffered))
    streamed.stream = _BodyStream(body, streamed, max_body, len(buffered))
    return streamed


class _BodyStream:
    """The rest of the app's body past what was buffered, checked against ``limits.max_body_bytes``.

    (An iterator class rather than an async generator, which mypyc cannot compile.)
    """

    __slots__ = ("_body", "_max_body", "_owner", "_seen")

    def __init__(self, body: IncomingBody, owner: RequestBody, max_body: int | None, seen: int) -> None:
        self._body = body
        self._owner = owner
        self._max_body = max_body
        self._seen = seen

    def __aiter__(self) -> _BodyStream:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._body.read(self._owner)
        if not chunk:
            raise StopAsyncIteration
        self._seen += len(chunk)
        if self._max_body is not None and self._seen > self._max_body:
            raise errors.RequestTooLarge(f"request body exceeds limits.max_body_bytes ({self._max_body})")
        return chunk


class Sent:
    """How a response went out to the app.

    A plain class, not a ``NamedTuple``: a named tuple's ``__new__`` is Python code,
    an interpreted call on every request of the compiled path.
    """

    __slots__ = ("broken", "head_sent_at", "keep_alive", "sent")

    def __init__(self, sent: int, broken: str | None, head_sent_at: float, keep_alive: bool) -> None:
        self.sent = sent  # body bytes sent to the app
        self.broken = broken  # the error code if the body broke off (the app's connection was aborted)
        self.head_sent_at = head_sent_at  # clock time the response head left
        self.keep_alive = keep_alive  # the connection stays open after this response


async def send_response(proto: EdgeProtocol, req: EdgeRequest, proxied: ProxyResponse, rid: str, attempts: int, *,
                        keep_alive: bool, idle_timeouts: Any) -> Sent:
    """Write the upstream's response (or a policy's) to the app."""
    upstream = proxied.upstream
    status = proxied.status
    parts = [status_line(status, upstream.reason if upstream is not None else None).encode("utf-8", "surrogateescape")]
    # An upstream's fields nobody read go out as they came; others are encoded from the mapping.
    fields = proxied.untouched_fields()
    found = _raw_fields(fields, parts) if fields is not None else _DECODE
    if found == _DECODE:
        del parts[1:]
        found = _decoded_fields(proxied.headers, parts)
    has_length = found == _HAS_LENGTH
    lines = [f"{REQUEST_ID_HEADER}: {rid}\r\n{ATTEMPTS_HEADER}: {attempts}\r\n"]
    bodyless = req.method == "HEAD" or status in _BODYLESS_STATUS or status < 200
    chunked = False
    body = b""
    if upstream is None or upstream.complete or bodyless:
        if not bodyless:
            body = proxied.body if upstream is None else upstream.read_all_nowait()
            if not has_length:
                lines.append(f"Content-Length: {len(body)}\r\n")
        whole = True
    else:
        whole = False
        if not has_length:
            if req.http10:
                keep_alive = False  # no chunked framing in HTTP/1.0: the body ends when the connection does
            else:
                chunked = True
                lines.append("Transfer-Encoding: chunked\r\n")
    connection = connection_line(keep_alive, req.http10)
    if connection is not None:
        lines.append(connection)
    parts.append(head_bytes(lines))
    head = b"".join(parts)
    clock = proto.listener.ctx.clock
    if whole:
        proto.write(head + body if body else head)
        proxied.release()
        return Sent(len(body), None, clock.now(), keep_alive)
    assert upstream is not None
    proto.write(head)
    head_at = clock.now()
    sent = 0
    completed = False
    broken: str | None = None
    try:
        while chunk := await upstream.read():
            proto.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            sent += len(chunk)
            if proto.write_paused:
                await proto.drain()
        if chunked:
            proto.write(b"0\r\n\r\n")
        completed = True
    except (UpstreamBodyError, errors.ProxyError) as exc:
        # The upstream died or stalled mid-body, or the app stopped reading: abort, so the app
        # sees a broken response rather than a silently short one.
        if isinstance(exc, UpstreamBodyTimeout):
            idle_timeouts.inc()
        broken = exc.code
        log.info("response body broke off after %d bytes; aborting the app's connection (%s)", sent, broken,
                 extra={"request_id": rid})
        proto.abort()
    except ConnectionError:
        pass  # the app went away mid-body; its request is still counted with the status sent
    finally:
        if completed:
            proxied.release()
        else:
            proxied.close()
    return Sent(sent, broken, head_at, keep_alive and completed)
