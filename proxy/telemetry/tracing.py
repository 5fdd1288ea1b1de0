"""OpenTelemetry tracing: provider setup, SERVER/CLIENT spans, propagation.

Settings come from ``telemetry.tracing`` first and the standard ``OTEL_*``
environment variables second.  The sampler is parent-based trace-id-ratio,
so an app's sampling decision is always respected and its trace continued.

Spans go through ``export.SpanQueue``, whose queue never blocks the event loop:
when it is full the span is dropped and counted.  The exporter (``export``'s
lean OTLP/HTTP one, or the SDK's gRPC one fed by our encoder) runs on the
queue's own thread, wrapped by ``_ExportGuard`` so that failures are
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
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.config import TelemetryConfig
from proxy.telemetry.export import SpanQueue, grpc_exporter, otlp_http_exporter
from proxy.telemetry.metrics import DROP_REASONS

if TYPE_CHECKING:
    from proxy.chain import ProxyRequest
    from proxy.telemetry.metrics import Metrics
    from proxy.upstream import UpstreamPool

__all__ = ["Tracing"]

log = logging.getLogger("outrigger.tracing")
_K8S_ENV = {"k8s.pod.name": "K8S_POD_NAME", "k8s.namespace.name": "K8S_NAMESPACE_NAME",
            "k8s.node.name": "K8S_NODE_NAME"}
# Loggers of the OTLP exporters and the batch processor; while an export runs their
# per-retry lines are folded into one report per interval (see _ExportGuard).
_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.sdk._shared_internal",
    "outrigger.tracing.export",
)
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0


class _ExportState:
    """Whether the collector is taking spans, plus dropped-span accounting (thread-safe).

    ``healthy`` is read on the hot path without a lock (a plain attribute read);
    the export thread clears it on a failed export or a full queue and sets it
    on the next successful export.  Drops are counted at once and logged at
    most once per interval.
    """

    def __init__(self, metrics: Metrics | None, interval_s: float) -> None:
        self.healthy = True
        self._counters = {reason: metrics.spans_dropped.labels(reason=reason) for reason in DROP_REASONS} \
            if metrics is not None else {}
        self._interval = interval_s
        self._lock = threading.Lock()
        self._last_log = -interval_s
        self._unreported = 0
        self.last_error: str | None = None

    def dropped(self, count: int, reason: str, why: str) -> None:
        counter = self._counters.get(reason)
        if counter is not None:
            counter.inc(count)
        with self._lock:
            self._unreported += count
            now = time.monotonic()
            if now - self._last_log < self._interval:
                return
            self._last_log = now
            count, self._unreported = self._unreported, 0
            detail = self.last_error
        log.warning("dropped %d spans: %s%s (next report in %.0fs at the earliest)", count, why,
                    f"; last exporter error: {detail}" if detail else "", self._interval)

    def queue_full(self) -> None:
        """A sampled span found the export queue full (called on the event loop)."""
        self.healthy = False
        self.dropped(1, "queue_full", "the span queue is full (the collector is slow or down)")

    def report_pending(self) -> None:
        """At shutdown: log the drops the interval has held back, since no later report will come."""
        with self._lock:
            count, self._unreported = self._unreported, 0
            detail = self.last_error
        if count:
            log.warning("dropped %d spans since the last report (at shutdown)%s", count,
                        f"; last exporter error: {detail}" if detail else "")


class _ExportLogFold(logging.Filter):
    """Swallows exporter log records raised inside ``_ExportGuard.export``, keeping the last message."""

    def __init__(self, report: _ExportState) -> None:
        super().__init__()
        self._report = report
        self.exporting = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(self.exporting, "active", False):
            return True  # construction and config warnings still get through
        if record.levelno >= logging.WARNING:
            self._report.last_error = record.getMessage()[:300]
        return False


class _ExportGuard(SpanExporter):
    """Wraps the real exporter: counts failures, folds its log spam, and can be aborted."""

    def __init__(self, inner: SpanExporter, report: _ExportState) -> None:
        self._inner = inner
        self._report = report
        self._aborted = False
        self._closed = False
        self._fold = _ExportLogFold(report)
        for name in _EXPORT_LOGGERS:
            logging.getLogger(name).addFilter(self._fold)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._aborted:
            self._report.dropped(len(spans), "shutdown",
                                 "tracing shut down before the collector accepted them")
            return SpanExportResult.FAILURE
        self._fold.exporting.active = True
        try:
            result = self._inner.export(spans)
        except Exception as exc:  # an exporter bug must not kill the export thread
            self._report.last_error = f"{type(exc).__name__}: {exc}"[:300]
            result = SpanExportResult.FAILURE
        finally:
            self._fold.exporting.active = False
        if result is SpanExportResult.SUCCESS:
            self._report.healthy = True
        else:
            self._report.healthy = False
            self._report.dropped(len(spans), "export_failed", "the trace collector did not accept them")
        return result

    def abort(self) -> None:
        """Stop retrying now: the exporter's shutdown wakes its backoff sleep."""
        self._aborted = True
        self.shutdown()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inner.shutdown()

    def detach_logs(self) -> None:
        for name in _EXPORT_LOGGERS:
            logging.getLogger(name).removeFilter(self._fold)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _CollectorGate:
    """While the collector is failing, record one trace per ``probe_interval_s`` instead of all.

    Spans made while exports fail would only be dropped later, after costing
    the hot path their attributes, events and queueing; this keeps the proxy
    at full speed instead.  The probe traces show when the collector is back
    (the next successful export reopens the gate).  Requests not recorded here
    still forward the app's own trace headers unchanged.
    """

    def __init__(self, state: _ExportState, probe_interval_s: float = 1.0) -> None:
        self._state = state
        self._probe_interval = probe_interval_s
        self._next_probe = 0.0

    def admit(self) -> bool:
        """While exports fail: True for one probe per interval, else count a drop and say False."""
        if self._state.healthy:
            return True
        now = time.monotonic()
        if now >= self._next_probe:
            self._next_probe = now + self._probe_interval
            return True
        self._state.dropped(1, "collector_down", "the trace collector is failing, so traces are not recorded")
        return False


def _propagators(names: Sequence[str]) -> TextMapPropagator:
    chosen: list[TextMapPropagator] = []
    for name in names:
        name = name.strip().lower()
        if name == "tracecontext":
            chosen.append(TraceContextTextMapPropagator())
        elif name == "baggage":
            chosen.append(W3CBaggagePropagator())
        elif name in ("b3", "b3multi"):
            from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
            chosen.append(B3SingleFormat() if name == "b3" else B3MultiFormat())
        elif name and name != "none":
            log.warning("unknown propagator %r ignored", name)
    return CompositePropagator(chosen)


def _ratio(value: str | None) -> float:
    try:
        ratio = float(value) if value else 1.0
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG %r is not a number; sampling everything", value)
        return 1.0
    return min(1.0, max(0.0, ratio))


def _sampler(ratio: float | None, env: Mapping[str, str]) -> tuple[Sampler, float | None]:
    """``sample_ratio`` wins; else ``OTEL_TRACES_SAMPLER(_ARG)``; else parent-based ratio 1.0.

    For the parent-based ratio sampler the root decision is returned separately
    (second item): ``start_server_span`` draws it before doing any trace work,
    so an unsampled root request costs one random draw.  The provider's sampler
    then only has to follow parents (``ParentBased(ALWAYS_ON)``).
    """
    if ratio is not None:
        return ParentBased(ALWAYS_ON), ratio
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_traceidratio").strip().lower()
    arg = env.get("OTEL_TRACES_SAMPLER_ARG")
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON, "always_off": ALWAYS_OFF,
        "parentbased_always_on": ParentBased(ALWAYS_ON), "parentbased_always_off": ParentBased(ALWAYS_OFF),
    }
    if name == "traceidratio":
        return TraceIdRatioBased(_ratio(arg)), None
    if name in samplers:
        return samplers[name], None
    if name != "parentbased_traceidratio":
        log.warning("unsupported OTEL_TRACES_SAMPLER %r; using parentbased_traceidratio", name)
    return ParentBased(ALWAYS_ON), _ratio(arg)


def _resource(config: TelemetryConfig, env: Mapping[str, str]) -> Resource:
    attributes: dict[str, Any] = {}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = urllib.parse.unquote(value.strip())
    attributes.update({key: env[var] for key, var in _K8S_ENV.items() if env.get(var)})
    attributes["service.name"] = config.service_name or env.get("OTEL_SERVICE_NAME") \
        or attributes.get("service.name") or "outrigger"
    return Resource.create(attributes)


def _exporter(config: TelemetryConfig, env: Mapping[str, str]) -> SpanExporter | None:
    tracing = config.tracing
    if tracing.exporter == "none":
        return None
    if tracing.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter()
    protocol = tracing.protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") \
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol == "grpc":
        return grpc_exporter(tracing.endpoint)
    return otlp_http_exporter(tracing.endpoint, env)


def _shutdown_timeout(env: Mapping[str, str]) -> float:
    raw = env.get("OTEL_BSP_EXPORT_TIMEOUT")
    try:
        return float(raw) / 1000.0 if raw else DEFAULT_SHUTDOWN_TIMEOUT_S
    except ValueError:
        return DEFAULT_SHUTDOWN_TIMEOUT_S


class Tracing:
    """Owns the tracer provider for the process; ``tracer`` is None when disabled."""

    def __init__(self, config: TelemetryConfig, *, metrics: Metrics | None = None,
                 env: Mapping[str, str] | None = None, exporter: SpanExporter | None = None,
                 report_interval_s: float = 30.0) -> None:
        """``exporter`` replaces the configured one (the demo keeps spans in memory)."""
        env = os.environ if env is None else env
        names: Sequence[str] = config.propagators or \
            env.get("OTEL_PROPAGATORS", "tracecontext,baggage").split(",")
        self.propagator = _propagators(names)
        self.provider: TracerProvider | None = None
        self.tracer: trace.Tracer | None = None
        self.shutdown_timeout_s = _shutdown_timeout(env)
        self._guard: _ExportGuard | None = None
        self._root_ratio: float | None = None
        self._gate: _CollectorGate | None = None
        self._random = random.random
        # Headers that carry a parent trace for the configured propagators (baggage alone does not).
        self._parent_fields = tuple(f for f in ("traceparent", "b3", "x-b3-traceid") if f in self.propagator.fields)
        disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        if exporter is None and not disabled and config.tracing.enabled:
            exporter = _exporter(config, env)
        if exporter is None:
            return
        self.export_state = _ExportState(metrics, report_interval_s)
        self._guard = _ExportGuard(exporter, self.export_state)
        sampler, self._root_ratio = _sampler(config.tracing.sample_ratio, env)
        self._gate = _CollectorGate(self.export_state)
        # shutdown_on_exit=False: the sidecar shuts down explicitly (and boundedly) on drain.
        self.provider = TracerProvider(resource=_resource(config, env), sampler=sampler,
                                       shutdown_on_exit=False)
        self.provider.add_span_processor(SpanQueue(self._guard, on_queue_full=self.export_state.queue_full))
        self.tracer = self.provider.get_tracer("outrigger")

    def start_server_span(self, name: str, headers: Mapping[str, str]) -> Span | None:
        """The SERVER span for one app request, or None when not recording."""
        if self.tracer is None:
            return None
        ratio = self._root_ratio
        if ratio is None:
            context = None  # extracted below, once the collector gate lets the trace through
        elif any(field in headers for field in self._parent_fields):
            context = self.propagator.extract(headers)
            if not trace.get_current_span(context).get_span_context().is_valid and self._random() >= ratio:
                return None  # the parent header was malformed: a root request after all, so the ratio decides
        elif self._random() >= ratio:
            return None  # an unsampled root request: no extract, no span, no attributes
        else:
            context = None
        if self._gate is not None and not self._gate.admit():
            return None  # the collector is down: skip the span entirely (the app's headers pass through)
        if context is None:
            context = self.propagator.extract(headers)
        span = self.tracer.start_span(name, context=context, kind=SpanKind.SERVER)
        return span if span.is_recording() else None

    def start_client_span(self, request: ProxyRequest, route: str, pool: UpstreamPool) -> Span:
        """A CLIENT span for one attempt, injected into that attempt's outgoing headers."""
        assert self.tracer is not None and request.span is not None
        attempt = request.attempt or 1
        path = request.path.partition("?")[0]  # query strings may carry secrets: never recorded
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "url.full": pool.base + path,
            "url.path": path,
            "server.address": pool.host,
            "server.port": pool.port,
            "outrigger.route": route,
            "outrigger.upstream": pool.name,
            "outrigger.attempt": attempt,
        }
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        endpoint = request.endpoint
        if endpoint is not None:  # a balanced upstream: the address this attempt went to
            host, _, port = endpoint.address.rpartition(":")
            attributes["network.peer.address"] = host.strip("[]")
            attributes["network.peer.port"] = int(port)
            attributes["outrigger.endpoint"] = endpoint.address
        span = self.tracer.start_span(request.method, context=trace.set_span_in_context(request.span),
                                      kind=SpanKind.CLIENT, attributes=attributes)
        self.propagator.inject(request.headers, context=trace.set_span_in_context(span))
        return span

    @staticmethod
    def end_client_span(span: Span, status: int | None, error: BaseException | None,
                        error_type: str | None = None) -> None:
        """End an attempt's span; ``error_type`` names an attempt cancelled without an error of its own."""
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, error_type))
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 400:  # semconv: 4xx and 5xx are errors on CLIENT spans
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        if error is not None:
            code = getattr(error, "code", None) or type(error).__name__
            span.set_attribute("error.type", code)
            span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        span.end()

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
