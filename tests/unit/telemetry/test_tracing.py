"""Tracing without the network: sampling cost, env settings, drop accounting, bounded shutdown."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence

import pytest
from multidict import CIMultiDict
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.chain import ProxyRequest, RequestBody
from proxy.config import TelemetryConfig, TracingConfig, UpstreamConfig
from proxy.logs import LogLimiter
from proxy.telemetry import client_span
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.tracing import Tracing
from proxy.upstream.call import UpstreamPool

SAMPLED_PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


def telemetry(ratio: float | None = 1.0, **kwargs: object) -> TelemetryConfig:
    return TelemetryConfig(tracing=TracingConfig(sample_ratio=ratio), **kwargs)  # type: ignore[arg-type]


def dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("outrigger_spans_dropped_total", {"reason": reason})
    return value or 0.0


class BlockingExporter(SpanExporter):
    """Blocks in export until shut down, like an OTLP exporter in retry backoff against a dead collector."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.exporting = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exporting.set()
        self.stop.wait(60)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.stop.set()


class FailingExporter(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").warning(
            "Transient error StatusCode.UNAVAILABLE, retrying in 1s"
        )
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


def test_sample_ratio_zero_gives_no_server_span_so_no_attributes_or_events_are_made() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(telemetry(0.0), env={}, exporter=exporter)
    assert tracing.start_server_span("GET r", CIMultiDict()) is None
    request = ProxyRequest("GET", "/x", CIMultiDict(), RequestBody(None), request_id="r", span=None)
    request.event("backoff", {"outrigger.wait_s": 1.0})  # a no-op without a span
    tracing.shutdown()
    assert exporter.get_finished_spans() == ()


def test_a_sampled_parent_is_followed_even_at_ratio_zero() -> None:
    tracing = Tracing(telemetry(0.0), env={}, exporter=InMemorySpanExporter())
    span = tracing.start_server_span("GET r", CIMultiDict(SAMPLED_PARENT))
    assert span is not None and span.is_recording()
    assert f"{span.get_span_context().trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    span.end()
    tracing.shutdown()


def test_an_unsampled_request_builds_no_span_attributes_but_still_gets_trace_headers() -> None:
    tracing = Tracing(telemetry(0.0), env={}, exporter=InMemorySpanExporter())

    def attributes() -> dict[str, object]:
        raise AssertionError("span attributes built for an unsampled request")

    span, trace_headers = tracing.begin(CIMultiDict(), "GET", attributes)
    assert span is None and trace_headers is not None and trace_headers.traceparent is not None
    assert trace_headers.traceparent.endswith(("-00", "-02"))  # not sampled
    tracing.shutdown()


@pytest.mark.parametrize("headers", [
    {"traceparent": "garbage"}, {"traceparent": ""},
    {"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},
])
def test_a_malformed_parent_header_is_a_root_request_so_the_ratio_decides(headers: dict[str, str]) -> None:
    tracing = Tracing(telemetry(0.0), env={}, exporter=InMemorySpanExporter())
    assert tracing.start_server_span("GET r", CIMultiDict(headers)) is None
    tracing.shutdown()
    tracing = Tracing(telemetry(1.0), env={}, exporter=InMemorySpanExporter())
    span = tracing.start_server_span("GET r", CIMultiDict(headers))
    assert span is not None and span.is_recording() and span.parent is None  # type: ignore[attr-defined]
    span.end()
    tracing.shutdown()


@pytest.mark.parametrize(
    "env, config",
    [
        ({"OTEL_SDK_DISABLED": "true"}, telemetry()),
        ({}, TelemetryConfig(tracing=TracingConfig(enabled=False))),
        ({}, TelemetryConfig(tracing=TracingConfig(exporter="none"))),
    ],
)
def test_disabled_tracing_has_no_tracer(env: dict[str, str], config: TelemetryConfig) -> None:
    tracing = Tracing(config, env=env)
    assert tracing.tracer is None and tracing.provider is None
    assert tracing.start_server_span("GET r", CIMultiDict(SAMPLED_PARENT)) is None
    tracing.shutdown()


@pytest.mark.parametrize(
    "env, recorded",
    [
        ({"OTEL_TRACES_SAMPLER": "always_off"}, False),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, False),
        ({"OTEL_TRACES_SAMPLER_ARG": "0"}, False),  # parent-based ratio is the default sampler
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, True),
        ({}, True),
    ],
)
def test_sampler_comes_from_the_environment_when_config_sets_no_ratio(
    env: dict[str, str], recorded: bool
) -> None:
    tracing = Tracing(telemetry(None), env=env, exporter=InMemorySpanExporter())
    span = tracing.start_server_span("GET r", CIMultiDict())
    assert (span is not None) is recorded
    tracing.shutdown()


def test_resource_names_the_service_and_the_pod() -> None:
    env = {
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs,team=pay%20ments",
        "K8S_POD_NAME": "p-1",
        "K8S_NAMESPACE_NAME": "ns",
    }
    resource = Tracing(telemetry(), env=env, exporter=InMemorySpanExporter()).provider.resource  # type: ignore[union-attr]
    assert resource.attributes["service.name"] == "from-attrs"
    assert resource.attributes["team"] == "pay ments"
    assert (resource.attributes["k8s.pod.name"], resource.attributes["k8s.namespace.name"]) == ("p-1", "ns")
    env["OTEL_SERVICE_NAME"] = "from-env"
    resource = Tracing(telemetry(), env=env, exporter=InMemorySpanExporter()).provider.resource  # type: ignore[union-attr]
    assert resource.attributes["service.name"] == "from-env"
    config = telemetry(service_name="from-config")
    resource = Tracing(config, env=env, exporter=InMemorySpanExporter()).provider.resource  # type: ignore[union-attr]
    assert resource.attributes["service.name"] == "from-config"


def test_client_span_is_injected_and_4xx_marks_it_as_error() -> None:
    exporter = InMemorySpanExporter()
    config = TelemetryConfig(tracing=TracingConfig(sample_ratio=1.0, redact_query_params=("token",)))
    tracing = Tracing(config, env={}, exporter=exporter)
    server = tracing.start_server_span("GET r", CIMultiDict())
    assert server is not None
    request = ProxyRequest(
        "GET", "/a?token=secret", CIMultiDict(), RequestBody(None), request_id="r", span=server
    )
    request.attempt = 2
    pool = UpstreamPool("svc", UpstreamConfig(url="http://10.0.0.1:8080/base"))
    client = tracing.start_client_span(request, "r", pool)
    context = client.get_span_context()
    flags = f"{context.trace_flags:02x}"
    assert request.headers["traceparent"] == f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags}"
    client_span.end(client, 404, None)
    server.end()
    tracing.shutdown()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "GET" and s.attributes]
    attrs = dict(span.attributes or {})
    assert attrs["url.full"] == "http://10.0.0.1:8080/base/a?token=REDACTED"  # kept, with the value redacted
    assert attrs["http.request.resend_count"] == 1 and attrs["error.type"] == "404"
    assert "secret" not in repr(attrs)


def test_failed_exports_are_counted_and_reported_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(process_collectors=False)
    inner = FailingExporter()
    tracing = Tracing(telemetry(), metrics=metrics, env={}, exporter=inner, report_interval_s=60)
    guard = tracing._guard
    assert guard is not None
    caplog.set_level(logging.WARNING)
    for _ in range(5):
        guard.export([object(), object()])  # type: ignore[list-item]
    assert inner.calls == 5
    assert dropped(metrics, "export_failed") == 10
    assert tracing.export_state.healthy is False
    reports = [r for r in caplog.records if r.name == "outrigger.tracing"]
    assert len(reports) == 1
    assert "UNAVAILABLE" in reports[0].getMessage()  # the exporter's own reason, folded in
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]
    tracing.shutdown(timeout_s=1)
    # The drops held back by the interval are reported at shutdown, as no later report will come.
    messages = [r.getMessage() for r in caplog.records if r.name == "outrigger.tracing"]
    assert len(messages) == 2 and messages[1].startswith("dropped 8 spans since the last report (at shutdown)")


def test_while_exports_fail_only_probe_traces_are_recorded() -> None:
    metrics = Metrics(process_collectors=False)
    tracing = Tracing(telemetry(), metrics=metrics, env={}, exporter=InMemorySpanExporter())
    tracing.export_state.healthy = False
    spans = [tracing.start_server_span("GET r", CIMultiDict(SAMPLED_PARENT)) for _ in range(50)]
    recorded = [s for s in spans if s is not None]
    assert len(recorded) == 1  # one probe per second
    assert dropped(metrics, "collector_down") == 49
    tracing.export_state.healthy = True  # a successful export reopens the gate
    assert tracing.start_server_span("GET r", CIMultiDict()) is not None
    tracing.shutdown()


def test_shutdown_is_bounded_when_the_exporter_is_stuck_in_retries() -> None:
    metrics = Metrics(process_collectors=False)
    inner = BlockingExporter()
    tracing = Tracing(telemetry(), metrics=metrics, env={}, exporter=inner)
    for _ in range(3):
        span = tracing.start_server_span("GET r", CIMultiDict())
        assert span is not None
        span.end()
    started = time.monotonic()
    tracing.shutdown(timeout_s=0.3)
    elapsed = time.monotonic() - started
    assert inner.stop.is_set()  # the exporter was told to stop retrying
    assert elapsed < 1.5, elapsed
    assert dropped(metrics, "export_failed") + dropped(metrics, "shutdown") == 3


def test_shutdown_bound_comes_from_otel_bsp_export_timeout() -> None:
    assert (
        Tracing(
            telemetry(), env={"OTEL_BSP_EXPORT_TIMEOUT": "750"}, exporter=InMemorySpanExporter()
        ).shutdown_timeout_s
        == 0.75
    )
    assert Tracing(telemetry(), env={}, exporter=InMemorySpanExporter()).shutdown_timeout_s == 5.0


def test_a_full_queue_drops_new_spans_and_counts_them() -> None:
    metrics = Metrics(process_collectors=False)
    inner = BlockingExporter()
    tracing = Tracing(telemetry(), metrics=metrics, exporter=inner,
                      env={"OTEL_BSP_MAX_QUEUE_SIZE": "4", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4"})
    first = tracing.start_server_span("GET r", CIMultiDict())
    assert first is not None
    for _ in range(4):  # wakes the worker, which then blocks in export
        span = tracing.start_server_span("GET r", CIMultiDict())
        assert span is not None
        span.end()
    assert inner.exporting.wait(5)
    for _ in range(4):
        span = tracing.start_server_span("GET r", CIMultiDict())
        assert span is not None
        span.end()
    first.end()  # the queue is full again: this one is dropped and counted
    assert dropped(metrics, "queue_full") == 1
    assert tracing.export_state.healthy is False
    tracing.shutdown(timeout_s=0.2)


def test_console_exporter_writes_one_json_line_per_span_to_stderr_not_stdout(
        capfd: pytest.CaptureFixture[str]) -> None:
    tracing = Tracing(TelemetryConfig(tracing=TracingConfig(exporter="console", sample_ratio=1.0)), env={})
    for _ in range(2):
        span = tracing.start_server_span("GET", CIMultiDict())
        assert span is not None
        span.end()
    tracing.shutdown()
    out, err = capfd.readouterr()
    assert out == ""  # stdout is the access log's
    spans = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert [s["name"] for s in spans] == ["GET", "GET"]


@pytest.mark.parametrize("env, config, expected", [
    ({}, TracingConfig(), {"sample_ratio": 1.0, "endpoint": "http://localhost:4317", "protocol": "grpc"}),
    ({"OTEL_TRACES_SAMPLER_ARG": "0.1", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
      "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, TracingConfig(),
     {"sample_ratio": 0.1, "endpoint": "http://c:4318/v1/traces", "protocol": "http/protobuf"}),
    ({"OTEL_TRACES_SAMPLER_ARG": "0.1"}, TracingConfig(sample_ratio=0.5, endpoint="http://x:4317"),
     {"sample_ratio": 0.5, "endpoint": "http://x:4317", "protocol": "grpc"}),
    ({"OTEL_TRACES_SAMPLER": "always_off"}, TracingConfig(), {"sample_ratio": 0.0, "sampler": "always_off"}),
])
def test_effective_settings_show_the_values_in_force_from_config_env_or_defaults(
        env: dict[str, str], config: TracingConfig, expected: dict[str, object]) -> None:
    settings = Tracing(TelemetryConfig(tracing=config), env=env, exporter=InMemorySpanExporter()).settings
    assert {key: settings[key] for key in expected} == expected


def test_a_log_limiter_logs_one_line_per_cause_per_interval_with_the_count_held_back(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    limiter = LogLimiter(logging.getLogger("outrigger.test"), interval_s=0.2)
    for _ in range(50):
        limiter.warning("a", "cause a")
        limiter.warning("b", "cause b")
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["cause a", "cause b"]
    time.sleep(0.25)
    limiter.warning("a", "cause a")
    assert "49 more since the last report" in caplog.records[-1].getMessage()


def test_the_span_queue_reads_otel_bsp_from_the_sidecars_env_not_the_process_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "9999")
    tracing = Tracing(telemetry(), env={"OTEL_BSP_MAX_QUEUE_SIZE": "64", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "16",
                                        "OTEL_BSP_SCHEDULE_DELAY": "250"}, exporter=InMemorySpanExporter())
    try:
        assert tracing.span_queue.sizes == (64, 16, 0.25)
    finally:
        tracing.shutdown(1.0)
