"""One access-log line, as a msgspec struct (encoded by ``proxy.telemetry.access_log``).

Apart from ``access_log.py`` because that module is compiled (``proxy/compiled.py``)
and a msgspec ``Struct`` subclass cannot be: it stays a plain Python class.
"""

from __future__ import annotations

import msgspec

__all__ = ["AccessEntry"]


class AccessEntry(msgspec.Struct, kw_only=True):
    """One access-log line; a request refused below the router leaves the request fields None."""

    request_id: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    method: str | None = None
    path: str | None = None
    route: str | None = None
    upstream: str | None = None
    endpoint: str | None = None  # the last attempt's endpoint, on balanced upstreams
    status: int
    attempts: int = 0
    duration_ms: float = 0.0
    upstream_duration_ms: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    error: str | None = None
    time: str = ""  # set by AccessLog.record
