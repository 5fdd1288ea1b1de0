"""The span export path against real loopback collectors: delivery, drops, flush, retries, abort."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import pytest
from multidict import CIMultiDict
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.config import TelemetryConfig, TracingConfig
from proxy.telemetry.export import OtlpHttpExporter, SpanQueue, otlp_http_exporter
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.tracing import Tracing
from tests.support.otlp_receiver import GrpcOtlpReceiver, HttpOtlpReceiver


class Recording(SpanExporter):
    def __init__(self, block: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self.block = block
        self.exporting = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exporting.set()
        if self.block is not None:
            self.block.wait(10)
        self.batches.append(len(spans))
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if self.block is not None:
            self.block.set()


class ScriptedCollector(http.server.ThreadingHTTPServer):
    """Answers POSTs with a scripted status list (then 200), recording headers; may drop keep-alives."""

    daemon_threads = True

    def __init__(self, statuses: Sequence[int] = (), close_after_reply: bool = False) -> None:
        self.statuses = list(statuses)
        self.close_after_reply = close_after_reply
        self.requests: list[dict[str, str]] = []
        self.spans = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(handler) -> None:  # the server is `self` here
                body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
                self.requests.append(dict(handler.headers.items()))
                status = self.statuses.pop(0) if self.statuses else 200
                if status == 200:
                    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                    self.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                handler.send_response(status)
                handler.send_header("Retry-After", "0")
                handler.send_header("Content-Length", "0")
                handler.end_headers()
                # Closing without "Connection: close" is what a collector's idle timeout looks like.
                handler.close_connection = self.close_after_reply

            def log_message(handler, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()  # quick shutdown()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


@pytest.fixture
def collector() -> Iterator[ScriptedCollector]:
    server = ScriptedCollector()
    yield server
    server.shutdown()
    server.server_close()


def spans(count: int, provider: TracerProvider) -> None:
    tracer = provider.get_tracer("outrigger")
    for i in range(count):
        tracer.start_span(f"GET r{i}", attributes={"outrigger.attempt": i}).end()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_spans_arrive_at_a_real_collector_with_their_attributes_and_resource(protocol: str) -> None:
    receiver = (HttpOtlpReceiver() if protocol == "http/protobuf" else GrpcOtlpReceiver()).start()
    try:
        config = TelemetryConfig(service_name="orders-sidecar", tracing=TracingConfig(
            protocol=protocol, endpoint=receiver.endpoint, sample_ratio=1.0))  # type: ignore[arg-type]
        tracing = Tracing(config, env={})
        span = tracing.start_server_span("GET orders", CIMultiDict())
        assert span is not None
        span.set_attributes({"http.response.status_code": 503, "url.path": "/v1/orders", "outrigger.attempt": 2})
        span.add_event("backoff", {"outrigger.attempt": 1})
        span.end()
        tracing.shutdown()
        received = receiver.wait_for(lambda got: len(got) >= 1, timeout=5)
    finally:
        receiver.stop()
    assert len(received) == 1
    (got,) = received
    assert (got.name, got.kind, got.scope) == ("GET orders", "SERVER", "outrigger")
    assert got.attributes == {"http.response.status_code": 503, "url.path": "/v1/orders", "outrigger.attempt": 2}
    assert got.events == [("backoff", {"outrigger.attempt": 1})]
    assert got.resource["service.name"] == "orders-sidecar"
    if isinstance(receiver, HttpOtlpReceiver):
        assert receiver.content_types == ["application/x-protobuf"]


def test_a_full_queue_drops_the_new_span_and_reports_each_drop() -> None:
    release = threading.Event()
    inner = Recording(block=release)
    drops: list[int] = []
    queue = SpanQueue(inner, on_queue_full=lambda: drops.append(1),
                      env={"OTEL_BSP_MAX_QUEUE_SIZE": "3", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "3"})
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(queue)
    spans(3, provider)  # a full batch: the worker takes it and blocks in export
    assert inner.exporting.wait(5)
    spans(5, provider)  # three fit, two do not
    assert len(drops) == 2
    release.set()
    provider.shutdown()
    assert inner.batches == [3, 3]


def test_a_full_queue_in_tracing_counts_queue_full_in_the_drop_metric() -> None:
    metrics = Metrics(process_collectors=False)
    release = threading.Event()
    inner = Recording(block=release)
    tracing = Tracing(TelemetryConfig(tracing=TracingConfig(sample_ratio=1.0)), metrics=metrics,
                      env={}, exporter=inner)
    assert tracing.provider is not None
    spans(2048 + 512, tracing.provider)  # the default batch goes to the blocked worker, then the queue fills
    spans(4, tracing.provider)
    value = metrics.registry.get_sample_value("outrigger_spans_dropped_total", {"reason": "queue_full"})
    assert value is not None and value >= 4
    release.set()
    tracing.shutdown(timeout_s=2)


def test_shutdown_flushes_what_is_queued_before_the_schedule_delay(collector: ScriptedCollector) -> None:
    queue = SpanQueue(OtlpHttpExporter(collector.endpoint), env={"OTEL_BSP_SCHEDULE_DELAY": "60000"})
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(queue)
    spans(7, provider)
    assert collector.spans == 0  # nothing is due for a minute
    provider.shutdown()
    assert collector.spans == 7


def test_a_retryable_status_is_retried_and_a_permanent_one_is_not(collector: ScriptedCollector) -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    spans(2, provider)
    exporter = OtlpHttpExporter(collector.endpoint, timeout_s=5)
    collector.statuses = [503, 429]
    assert exporter.export(memory.get_finished_spans()) is SpanExportResult.SUCCESS
    assert len(collector.requests) == 3 and collector.spans == 2
    collector.statuses = [400]
    assert exporter.export(memory.get_finished_spans()) is SpanExportResult.FAILURE
    assert len(collector.requests) == 4


def test_a_keep_alive_connection_the_collector_closed_is_replaced_without_a_failure() -> None:
    server = ScriptedCollector(close_after_reply=True)
    try:
        exporter = OtlpHttpExporter(server.endpoint, timeout_s=5)
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        spans(3, provider)  # three exports, each on a connection the previous reply left dead
        assert server.spans == 3
    finally:
        server.shutdown()
        server.server_close()


def test_shutdown_unblocks_an_export_stuck_on_a_collector_that_never_answers() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True).start()
    exporter = OtlpHttpExporter(f"http://127.0.0.1:{listener.getsockname()[1]}/v1/traces", timeout_s=30)
    results: list[SpanExportResult] = []
    memory = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    spans(1, provider)
    worker = threading.Thread(target=lambda: results.append(exporter.export(memory.get_finished_spans())))
    worker.start()
    deadline = time.monotonic() + 5
    while not accepted and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    exporter.shutdown()
    worker.join(5)
    listener.close()
    for sock in accepted:
        sock.close()
    assert not worker.is_alive() and results == [SpanExportResult.FAILURE]


def test_exporter_settings_come_from_the_otlp_environment_and_headers_are_sent(
        collector: ScriptedCollector) -> None:
    base = collector.endpoint.removesuffix("/v1/traces")
    env = {"OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%3Dcret,tenant=t1",
           "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "api-key=traces-wins", "OTEL_EXPORTER_OTLP_TIMEOUT": "3"}
    exporter = otlp_http_exporter(base, env)
    assert exporter.endpoint == collector.endpoint  # a base URL gets the signal path
    assert otlp_http_exporter(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": base + "/"}).endpoint == collector.endpoint
    assert otlp_http_exporter(None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": base + "/custom"}).endpoint == \
        base + "/custom"
    assert exporter.export([]) is SpanExportResult.SUCCESS
    assert collector.requests[0]["api-key"] == "traces-wins"
    assert otlp_http_exporter(base, {"OTEL_EXPORTER_OTLP_HEADERS": "api-key=s%3Dcret"}).export([]) \
        is SpanExportResult.SUCCESS
    assert collector.requests[1]["api-key"] == "s=cret"


def test_a_bad_endpoint_or_compression_is_refused_with_its_value() -> None:
    with pytest.raises(ValueError, match="ftp://x"):
        OtlpHttpExporter("ftp://x/v1/traces")
    with pytest.raises(ValueError, match="brotli"):
        OtlpHttpExporter("http://127.0.0.1:1/v1/traces", compression="brotli")
