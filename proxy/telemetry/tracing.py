"""OpenTelemetry tracing: provider setup, SERVER/CLIENT spans, propagation.

Settings come from ``telemetry.tracing`` first and the standard ``OTEL_*``
environment variables second.  The sampler is parent-based trace-id-ratio,
so an app's sampling decision is always respected and its trace continued.

Spans go through ``export.SpanQueue``, whose queue never blocks the event loop:
when it is full the span is dropped and counted.  The exporter (``export``'s
lean OTLP/HTTP one, or the SDK's gRPC one fed by our encoder) runs on the
queue's own thread, wrapped by ``export_health.ExportGuard`` so that failures are
counted in ``outrigger_spans_dropped_total`` and reported once per interval
(the OTLP exporters' own per-retry log lines are folded into that report).
``Tracing.shutdown`` flushes what it can within a bound and then aborts the
exporter's retries, so a dead collector cannot stall a drain.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import (
    Decision,
    Sampler,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Span, SpanContext, SpanKind, TraceFlags

from proxy import __version__
from proxy.config import TelemetryConfig
from proxy.telemetry import client_span, sdk_setup
from proxy.telemetry.export import SpanQueue
from proxy.telemetry.export_health import CollectorGate, ExportGuard, ExportState
from proxy.telemetry.lean_span import SpanFactory, parent_context
from proxy.telemetry.propagation import (
    RANDOM,
    SAMPLED,
    Headers,
    TraceHeaders,
    TraceParent,
    extract,
    format_traceparent,
    new_trace_id,
    pass_through,
    unrecorded_traceparent,
    with_parent_id,
)
from proxy.telemetry.query import redaction_set
from proxy.telemetry.server_span import span_name
from proxy.telemetry.settings import effective_service_name, effective_tracing

if TYPE_CHECKING:
    from proxy.chain import ProxyRequest
    from proxy.telemetry.metrics import Metrics
    from proxy.upstream.call import UpstreamPool

__all__ = ["Tracing"]

log = logging.getLogger("outrigger.tracing")




def _parent_span(parent: TraceParent) -> SpanContext:
    """The span context of the app's (W3C) parent span, for a span we start under it."""
    return SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                       trace_flags=TraceFlags(parent.flags & (SAMPLED | RANDOM)))


class _Provider(TracerProvider):
    """The SDK's provider, which also tells the span factory about each processor added to it."""

    def __init__(self, factory: SpanFactory, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.outrigger_spans = factory

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self.outrigger_spans.add_processor(span_processor)


class Tracing:
    """Owns the tracer provider for the process; ``tracer`` is None when disabled."""

    def __init__(self, config: TelemetryConfig, *, metrics: Metrics | None = None,
                 env: Mapping[str, str] | None = None, exporter: SpanExporter | None = None,
                 report_interval_s: float = 30.0) -> None:
        """``exporter`` replaces the configured one (the demo keeps spans in memory)."""
        env = os.environ if env is None else env
        names: Sequence[str] = config.propagators or \
            env.get("OTEL_PROPAGATORS", "tracecontext,baggage").split(",")
        self.propagator, self.w3c = sdk_setup.propagators(names)
        self.settings = effective_tracing(config, env, names)  # what /config and the startup line show
        self.service_name = effective_service_name(config, env)
        self.provider: TracerProvider | None = None
        self.tracer: trace.Tracer | None = None
        self.shutdown_timeout_s = sdk_setup.shutdown_timeout(env)
        self._guard: ExportGuard | None = None
        self._root_ratio: float | None = None
        self._gate: CollectorGate | None = None
        self._random = random.random
        # Headers that carry a parent trace for the configured propagators (baggage alone does not).
        self._parent_fields = tuple(f for f in ("b3", "x-b3-traceid") if f in self.propagator.fields)
        self._sampler: Sampler | None = None
        self.redact = redaction_set(config.tracing.redact_query_params)
        disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        if exporter is None and not disabled and config.tracing.enabled:
            exporter = sdk_setup.exporter(config, env)
        if exporter is None:
            return
        self.export_state = ExportState(metrics, report_interval_s)
        self._guard = ExportGuard(exporter, self.export_state)
        sampler, self._root_ratio = sdk_setup.sampler(config.tracing.sample_ratio, env)
        self._sampler = sampler
        self._gate = CollectorGate(self.export_state)
        resource = sdk_setup.resource(config, env)
        # sampler None: begin draws root decisions itself, and the provider's sampler only follows parents
        self._spans = SpanFactory(resource, InstrumentationScope("outrigger", __version__),
                                  None if self._root_ratio is not None else sampler)
        # shutdown_on_exit=False: the sidecar shuts down explicitly (and boundedly) on drain.
        self.provider = _Provider(self._spans, resource=resource, sampler=sampler, shutdown_on_exit=False)
        # OTEL_BSP_* come from the same env as every other setting (the sidecar's, in tests their own).
        self.span_queue = SpanQueue(self._guard, on_queue_full=self.export_state.queue_full, env=env)
        self.provider.add_span_processor(self.span_queue)
        self.tracer = self.provider.get_tracer("outrigger", __version__)

    def start_server_span(self, name: str, headers: Headers) -> Span | None:
        """The SERVER span for one app request, or None when not recording (see ``begin``)."""
        return self.begin(headers, name, dict)[0]

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
        tracer = self.tracer
        if tracer is None:  # tracing off: a pass-through that drops only what is malformed
            return None, pass_through(headers) if w3c else None
        parent, tracestate = extract(headers) if w3c else (None, None)
        remote: SpanContext | None = None  # a b3 parent
        random_flag = RANDOM  # our own root trace ids are random
        sampled: bool | None = None  # None: a root request, not decided yet
        if parent is not None:
            sampled, random_flag = parent.sampled, parent.flags & RANDOM
        elif self._parent_fields and any(field in headers for field in self._parent_fields):
            found = trace.get_current_span(self.propagator.extract(headers)).get_span_context()  # b3
            if found.is_valid:
                remote, sampled, random_flag = found, found.trace_flags.sampled, 0
        if sampled is None and self._root_ratio is not None:
            sampled = self._random() < self._root_ratio  # an unsampled root costs one random draw
        if sampled is not False and (self._gate is None or self._gate.admit()):
            span = self._spans.start(name, _parent_span(parent) if parent is not None else remote, SpanKind.SERVER,
                                     attributes())
            own = span.get_span_context()
            if span.is_recording():
                # the SDK's flags: sampled, and random as the parent says (or for its own random root ids)
                return span, TraceHeaders(format_traceparent(own.trace_id.to_bytes(16, "big").hex(),
                                                             own.span_id.to_bytes(8, "big").hex(),
                                                             int(own.trace_flags)), tracestate) if w3c else None
            sampled = own.trace_flags.sampled  # an SDK sampler from OTEL_TRACES_SAMPLER said no
        if not w3c:
            return None, None
        # Not recorded (unsampled, or the collector is down): the same headers, with ids of our own.
        if parent is not None:
            trace_id: str | None = parent.trace_id
        elif remote is not None:
            trace_id = f"{remote.trace_id:032x}"
        else:
            trace_id = None  # a new trace
        if sampled is None:  # the collector gate said no before an SDK sampler could decide
            assert self._sampler is not None
            trace_id = trace_id or new_trace_id()
            context = parent_context(_parent_span(parent) if parent is not None else remote)
            decision = self._sampler.should_sample(context, int(trace_id, 16), name).decision
            sampled = decision is Decision.RECORD_AND_SAMPLE
        return None, TraceHeaders(unrecorded_traceparent(trace_id, random_flag | (SAMPLED if sampled else 0)),
                                  tracestate)

    def start_client_span(self, request: ProxyRequest, route: str, pool: UpstreamPool) -> Span:
        """A CLIENT span for one attempt, injected into that attempt's outgoing headers."""
        assert self.tracer is not None and request.span is not None
        endpoint = request.endpoint
        attributes = client_span.start_attributes(
            method=request.method, path=request.path, route=route, base=pool.base, host=pool.host, port=pool.port,
            upstream=pool.name, attempt=request.attempt, endpoint=endpoint.address if endpoint is not None else None,
            redact=self.redact)
        span = self._spans.start(span_name(request.method, None), request.span.get_span_context(), SpanKind.CLIENT,
                                 attributes)
        if self.w3c:  # the edge wrote the request's traceparent; each attempt names its own span as parent
            own = span.get_span_context()
            current = request.headers.get("traceparent")
            request.headers["traceparent"] = with_parent_id(current, own.span_id) if current is not None \
                else format_traceparent(f"{own.trace_id:032x}", f"{own.span_id:016x}", int(own.trace_flags))
        if self._parent_fields:  # b3 configured: the SDK propagator writes its headers too
            self.propagator.inject(request.headers, context=trace.set_span_in_context(span))
        return span

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Flush and stop, within ``timeout_s`` (``OTEL_BSP_EXPORT_TIMEOUT``, default 5s).

        Blocking, so call it from a thread.  The SDK's own shutdown waits for
        every queued batch and each export retries for up to the exporter
        timeout, so with the collector down it could take minutes; past the
        bound the exporter is aborted and what is left is dropped.
        """
        provider, self.provider = self.provider, None  # idempotent; the tracer stays usable
        if provider is None:
            return
        bound = self.shutdown_timeout_s if timeout_s is None else timeout_s
        finished = threading.Event()

        def run() -> None:
            try:
                provider.shutdown()
            except Exception as exc:
                log.debug("tracer provider shutdown failed", exc_info=exc)
            finally:
                finished.set()

        threading.Thread(target=run, name="outrigger-tracing-shutdown", daemon=True).start()
        guard = self._guard
        if not finished.wait(bound) and guard is not None:
            guard.abort()
            if not finished.wait(1.0):
                log.warning("tracing did not shut down within %.1fs; abandoning unexported spans",
                            bound + 1.0)
        if guard is not None and finished.is_set():
            guard.detach_logs()
        self.export_state.report_pending()
