"""Addresses and URLs in the config: ``host:port`` parsing, port clashes, upstream and Redis URLs.

Pure functions of strings.  ``parse_address`` and ``same_socket`` are also what the
sidecar binds and rebinds with (``lifecycle/sidecar.py``), so that what ``validate``
accepts is what ``run`` can listen on.  The ``*_url_problem`` functions return the
message of the first problem, or None; ``checks.py`` puts it at the url's path.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import SplitResult, urlsplit

__all__ = ["parse_address", "redis_url_problem", "same_socket", "upstream_url_problem"]

_WILDCARDS = frozenset({"0.0.0.0", "::", "*"})
_LOOPBACK = frozenset({"127.0.0.1", "::1"})


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError when malformed."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"invalid address {address!r}; expected host:port")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"invalid port {port} in {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    return host, port


def same_socket(a: str, b: str) -> bool:
    """Whether listening on ``a`` and on ``b`` would take the same port (port 0 never clashes)."""
    host_a, port_a = parse_address(a)
    host_b, port_b = parse_address(b)
    if port_a != port_b or port_a == 0:
        return False
    if host_a == host_b or host_a in _WILDCARDS or host_b in _WILDCARDS:
        return True
    # `localhost` binds every loopback address it resolves to (127.0.0.1 and often ::1).
    return (host_a == "localhost" and host_b in _LOOPBACK) or (host_b == "localhost" and host_a in _LOOPBACK)


def upstream_url_problem(url: str) -> str | None:
    """What is wrong with an upstream's ``url`` (scheme, host, credentials, query, port), or None."""
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return f"the upstream url must not contain whitespace or control characters: {url!r}"
    parts = _split(url)
    if isinstance(parts, str):
        return parts
    problem = _scheme_and_host_problem(parts, url, ("http", "https"), "http:// or https://")
    if problem:
        return problem
    if "@" in parts.netloc:
        return ("credentials in the upstream url are not supported (they would not be sent); "
                "let the app send its Authorization header")
    if parts.query or parts.fragment:
        return f"the upstream url may carry a path prefix but no query or fragment: {url!r}"
    return _port_problem(parts, url)


def redis_url_problem(url: str) -> str | None:
    """What is wrong with ``redis.url`` (scheme, host, port, a database number as its path), or None."""
    parts = _split(url)
    if isinstance(parts, str):
        return parts
    problem = _scheme_and_host_problem(parts, url, ("redis", "rediss"), "redis:// or rediss:// (TLS)") \
        or _port_problem(parts, url)
    if problem:
        return problem
    if parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return f"the path of {url!r} must be a database number, like /0"
    return None


def _split(url: str) -> SplitResult | str:
    """The url's parts, or what is wrong with it when it does not even split (``http://[::1``)."""
    try:
        return urlsplit(url)
    except ValueError as exc:
        return f"{url!r} is not a valid URL: {exc}"


def _scheme_and_host_problem(parts: SplitResult, url: str, schemes: tuple[str, ...], use: str) -> str | None:
    if parts.scheme not in schemes:
        return f"unsupported scheme in {url!r}; use {use}"
    if not parts.hostname:
        return f"missing host in {url!r}"
    return None


def _port_problem(parts: SplitResult, url: str) -> str | None:
    try:
        _ = parts.port
    except ValueError:
        return f"invalid port in {url!r}"
    return None
