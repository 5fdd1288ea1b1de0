"""Label values shared by the metrics and the spans: the method and the status class.

Apart from ``metrics`` because the request path calls them on every request
(``server_span.span_name`` among them) and this module is compiled
(``proxy/compiled.py``), while ``metrics`` holds prometheus_client's families.
"""

from __future__ import annotations

from typing import Final

__all__ = ["method_label", "status_class"]

_CLASSES: Final = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def status_class(status: int) -> str:
    return _CLASSES.get(status // 100, "other")


def method_label(method: str) -> str:
    """The method as a label value; any non-standard token is ``_OTHER`` (semconv), so apps
    sending made-up methods cannot grow the series count."""
    return method if method in _METHODS else "_OTHER"
