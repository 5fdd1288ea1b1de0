"""The per-request tracing decision: the SERVER span of one app request and the trace headers it sends.

Owned by ``tracing.Tracing``, which builds a ``RequestTracing`` from its
settings and exposes its ``begin``; apart from ``tracing`` because this runs
on every request, sampled or not, and this module is compiled
(``proxy/compiled.py``) while ``tracing`` sets up the SDK once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.trace import Span, SpanContext, SpanKind, TraceFlags

from proxy.telemetry.export_health import CollectorGate
from proxy.telemetry.lean_span import SpanFactory, parent_context
from proxy.telemetry.propagation import (
    RANDOM,
    SAMPLED,
    Headers,
    TraceHeaders,
    TraceParent,
    extract,
    new_trace_id,
    pass_through,
    trace_id_hex,
    traceparent_of,
    unrecorded_traceparent,
)

__all__ = ["RequestTracing"]


def _parent_span(parent: TraceParent) -> SpanContext:
    """The span context of the app's (W3C) parent span, for a span we start under it."""
    return SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                       trace_flags=TraceFlags(parent.flags & (SAMPLED | RANDOM)))


class RequestTracing:
    """Decides on each app request; ``spans`` None: tracing is off (headers pass through, checked)."""

    def __init__(self, *, w3c: bool, propagator: TextMapPropagator, parent_fields: tuple[str, ...],
                 spans: SpanFactory | None = None, root_ratio: float | None = None,
                 random: Callable[[], float] | None = None, gate: CollectorGate | None = None,
                 sampler: Sampler | None = None) -> None:
        self.w3c = w3c
        self.propagator = propagator
        self.parent_fields = parent_fields  # headers that carry a b3 parent (configured propagators)
        self.spans = spans
        self.root_ratio = root_ratio
        self.random = random
        self.gate = gate
        self.sampler = sampler

    def begin(self, headers: Headers, name: str,
              attributes: Callable[[], dict[str, Any]]) -> tuple[Span | None, TraceHeaders | None]:
        """Decide on one app request: its SERVER span (None: not recorded) and the trace headers it sends.

        The trace headers do not depend on whether the span is recorded: with
        the collector down, or a root request not sampled, the request still
        leaves with a valid ``traceparent`` (the app's trace, or a new one),
        whose sampled flag is the sampling decision.  ``attributes`` is called
        only for a span that is sampled, so an unsampled request builds none.
        None for the headers: ``tracecontext`` is not a configured propagator.
        """
        w3c = self.w3c
        spans = self.spans
        if spans is None:  # tracing off: a pass-through that drops only what is malformed
            return None, pass_through(headers) if w3c else None
        parent, tracestate = extract(headers) if w3c else (None, None)
        remote: SpanContext | None = None  # a b3 parent
        random_flag = RANDOM  # our own root trace ids are random
        sampled: bool | None = None  # None: a root request, not decided yet
        if parent is not None:
            sampled, random_flag = parent.sampled, parent.flags & RANDOM
        elif self.parent_fields and any(field in headers for field in self.parent_fields):
            found = trace.get_current_span(self.propagator.extract(headers)).get_span_context()  # b3
            if found.is_valid:
                remote, sampled, random_flag = found, found.trace_flags.sampled, 0
        root_ratio = self.root_ratio
        if sampled is None and root_ratio is not None and self.random is not None:
            sampled = self.random() < root_ratio  # an unsampled root costs one random draw
        gate = self.gate
        if sampled is not False and (gate is None or gate.admit()):
            span = spans.start(name, _parent_span(parent) if parent is not None else remote, SpanKind.SERVER,
                               attributes())
            own = span.get_span_context()
            if span.is_recording():
                # the SDK's flags: sampled, and random as the parent says (or for its own random root ids)
                return span, TraceHeaders(traceparent_of(own), tracestate) if w3c else None
            sampled = own.trace_flags.sampled  # an SDK sampler from OTEL_TRACES_SAMPLER said no
        if not w3c:
            return None, None
        # Not recorded (unsampled, or the collector is down): the same headers, with ids of our own.
        trace_id: str | None = None  # None: a new trace
        if parent is not None:
            trace_id = parent.trace_id
        elif remote is not None:
            trace_id = trace_id_hex(remote.trace_id)
        if sampled is None:  # the collector gate said no before an SDK sampler could decide
            sampler = self.sampler
            assert sampler is not None
            trace_id = trace_id or new_trace_id()
            context = parent_context(_parent_span(parent) if parent is not None else remote)
            decision = sampler.should_sample(context, int(trace_id, 16), name).decision
            sampled = decision is Decision.RECORD_AND_SAMPLE
        return None, TraceHeaders(unrecorded_traceparent(trace_id, random_flag | (SAMPLED if sampled else 0)),
                                  tracestate)
