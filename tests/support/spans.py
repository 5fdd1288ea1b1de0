"""A span fake for unit tests of policies: it records the events a policy adds.

Policies only call ``request.event(...)``, which calls ``span.add_event`` on the
request's SERVER span; ``record_events`` puts an ``EventSpan`` there and returns
it.  Tests of real spans use the SDK's in-memory exporter instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from proxy.chain import ProxyRequest

__all__ = ["EventSpan", "record_events"]


class EventSpan:
    """The part of an OpenTelemetry span that policies use: ``add_event``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None) -> None:
        self.events.append((name, dict(attributes or {})))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def record_events(request: ProxyRequest) -> EventSpan:
    """Give ``request`` an ``EventSpan`` as its span and return it."""
    span = EventSpan()
    request.span = cast("Span", span)
    return span
