"""How an upstream exchange fails outside a ``ProxyError``: a bad upload, a bad response, a body broken off.

Kept apart from ``proxy.upstream.response`` because these are plain Python
exception classes: ``UpstreamBodyTimeout`` is also a ``TimeoutError``, a
built-in base that mypyc-compiled classes cannot have (see ``setup.py``).
"""

from __future__ import annotations

from proxy import errors

__all__ = ["InvalidResponse", "UploadFailed", "UpstreamBodyError", "UpstreamBodyProtocolError", "UpstreamBodyTimeout"]


class UploadFailed(RuntimeError):
    """The app's request body stream raised while it was being sent: an internal error, not an upstream one."""


class InvalidResponse(Exception):
    """The upstream's bytes are not a valid HTTP/1.1 response (the parse error's cause)."""


class UpstreamBodyError(Exception):
    """The response body broke off after its head was relayed; ``code`` is the public error code."""

    code = errors.UpstreamReset.code


class UpstreamBodyProtocolError(UpstreamBodyError):
    """The body's framing was invalid (a bad chunk size...)."""

    code = errors.UpstreamProtocolError.code


class UpstreamBodyTimeout(UpstreamBodyError, TimeoutError):
    """Nothing arrived within the route's ``timeout.idle`` while the body was being read."""

    code = errors.UpstreamTimeout.code
