"""Response heads as bytes: the status line, header lines and the connection header.

Used by ``proxy.edge.bodies`` (proxied responses), ``proxy.edge.exchange``
(error replies) and ``proxy.edge.tunnel`` (the upstream's 101, verbatim).
Every status line says ``HTTP/1.1`` (RFC 9110 §2.5: a server sends its own
version); an HTTP/1.0 app gets no chunked framing and an explicit
``Connection: keep-alive`` when its connection stays open.  Header values
are ``str`` decoded with ``surrogateescape``, so encoding them back gives the
upstream's bytes, UTF-8 or not.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import Final

from proxy.edge.headers import ATTEMPTS_HEADER
from proxy.errors import ErrorReply

__all__ = ["CLOSE", "KEEP_ALIVE", "error_bytes", "head_bytes", "reason_of", "status_line"]

_REASONS: Final = {int(status): status.phrase for status in HTTPStatus}
CLOSE: Final = "Connection: close\r\n"
KEEP_ALIVE: Final = "Connection: keep-alive\r\n"


def reason_of(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def status_line(status: int, reason: str | None = None) -> str:
    return f"HTTP/1.1 {status} {reason_of(status) if reason is None else reason}\r\n"


def head_bytes(lines: list[str]) -> bytes:
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def connection_line(keep_alive: bool, http10: bool) -> str | None:
    if not keep_alive:
        return CLOSE
    return KEEP_ALIVE if http10 else None


def header_lines(headers: Iterable[tuple[str, str]]) -> list[str]:
    return [f"{name}: {value}\r\n" for name, value in headers]


def error_bytes(reply: ErrorReply, *, attempts: int, keep_alive: bool, http10: bool, head_only: bool = False) -> bytes:
    """A whole error response (head and JSON body) for one write."""
    lines = [status_line(reply.status)]
    lines.extend(header_lines(reply.headers.items()))
    lines.append(f"{ATTEMPTS_HEADER}: {attempts}\r\n")
    lines.append(f"Content-Length: {len(reply.body)}\r\n")
    connection = connection_line(keep_alive, http10)
    if connection is not None:
        lines.append(connection)
    head = head_bytes(lines)
    return head if head_only else head + reply.body
