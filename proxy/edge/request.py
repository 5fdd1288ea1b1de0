"""One parsed app request, and the checks its head must pass before it is served.

Built by ``proxy.edge.protocol`` when llhttp reports a complete head; served
by ``proxy.edge.exchange``.  The checks here are the ones llhttp leaves to
the server: the whole-head size, the HTTP version, ``Host`` and the transfer
codings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from multidict import CIMultiDict

from proxy import errors
from proxy.edge.headers import CONTENT_LENGTH, HOST, TRANSFER_ENCODING

if TYPE_CHECKING:
    from proxy.edge.bodies import IncomingBody

__all__ = ["EdgeRequest", "Refused", "check_head"]


class EdgeRequest:
    """One parsed request head and its body."""

    __slots__ = ("body", "content_length", "headers", "http10", "keep_alive", "leftover", "method", "target",
                 "upgrade")

    def __init__(self, method: str, target: str, http10: bool, headers: CIMultiDict[str], keep_alive: bool,
                 upgrade: bool, content_length: int | None, body: IncomingBody | None) -> None:
        self.method = method
        self.target = target
        self.http10 = http10
        self.headers = headers
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.content_length = content_length
        self.body = body
        self.leftover = b""  # bytes after an upgrade request: the new protocol's, or the next request's


class Refused(Exception):
    """Raised from a parser callback to refuse the request with ``error``."""

    def __init__(self, error: errors.ProxyError) -> None:
        self.error = error


def check_head(version: str, headers: CIMultiDict[str], head_size: int, max_head: int) -> tuple[bool, int | None]:
    """(HTTP/1.0?, Content-Length) of a head that may be served; ``Refused`` otherwise."""
    if head_size > max_head:
        raise Refused(errors.HeadersTooLarge(f"request head exceeds limits.max_header_bytes ({max_head} bytes)"))
    # llhttp runs with lenient versions so that HTTP/1.2 is served as 1.1 (RFC 9110 §2.5).
    if version != "1.1" and version != "1.0" and not version.startswith("1."):
        raise Refused(errors.BadRequest("malformed HTTP request: HTTP version not supported; "
                                        "send HTTP/1.0 or HTTP/1.1"))
    http10 = version == "1.0"
    hosts = headers.getall(HOST, ())
    if len(hosts) > 1:
        raise Refused(errors.BadRequest("malformed HTTP request: Duplicate 'Host' header found"))
    if not hosts and not http10:
        raise Refused(errors.BadRequest("malformed HTTP request: Missing 'Host' header in request"))
    coding = headers.get(TRANSFER_ENCODING)
    if coding is not None:
        codings = [c.strip().lower() for c in coding.split(",")]
        if codings[-1] != "chunked":
            raise Refused(errors.BadRequest("malformed HTTP request: request Transfer-Encoding must end "
                                            "with chunked"))
        if len(codings) > 1:  # gzip, chunked...: the upstream could not tell the body is coded
            raise Refused(errors.TransferCodingNotImplemented(
                "request Transfer-Encoding other than chunked is not supported"))
        return http10, None
    raw_length = headers.get(CONTENT_LENGTH)
    return http10, int(raw_length) if raw_length is not None else None  # llhttp has checked its syntax
