"""Export health: whether the trace collector is taking spans, and what is dropped when it is not.

``ExportState`` is read on the hot path (``healthy``) and written by the export
thread; it counts dropped spans in ``outrigger_spans_dropped_total{reason}`` and
logs them at most once per interval.  ``ExportGuard`` wraps the real exporter:
it counts failures, folds the OTLP exporters' per-retry log lines into that one
report, and can be aborted at shutdown.  ``CollectorGate`` lets one probe trace
per interval through while exports fail, so a dead collector costs the hot path
nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from proxy.telemetry.metrics import DROP_REASONS

if TYPE_CHECKING:
    from proxy.telemetry.metrics import Metrics

__all__ = ["CollectorGate", "ExportGuard", "ExportState"]

log = logging.getLogger("outrigger.tracing")
_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
    "opentelemetry.exporter.otlp.common.http",
    "opentelemetry.sdk._shared_internal",
    "outrigger.tracing.export",
)


class ExportState:
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
    """Swallows exporter log records raised inside ``ExportGuard.export``, keeping the last message."""

    def __init__(self, report: ExportState) -> None:
        super().__init__()
        self._report = report
        self.exporting = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(self.exporting, "active", False):
            return True  # construction and config warnings still get through
        if record.levelno >= logging.WARNING:
            self._report.last_error = record.getMessage()[:300]
        return False


class ExportGuard(SpanExporter):
    """Wraps the real exporter: counts failures, folds its log spam, and can be aborted."""

    def __init__(self, inner: SpanExporter, report: ExportState) -> None:
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


class CollectorGate:
    """While the collector is failing, record one trace per ``probe_interval_s`` instead of all.

    Spans made while exports fail would only be dropped later, after costing
    the hot path their attributes, events and queueing; this keeps the proxy
    at full speed instead.  The probe traces show when the collector is back
    (the next successful export reopens the gate).  Requests not recorded here
    still forward the app's own trace headers unchanged.
    """

    def __init__(self, state: ExportState, probe_interval_s: float = 1.0) -> None:
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
