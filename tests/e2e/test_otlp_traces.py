"""``outrigger run`` as a subprocess exporting to real OTLP receivers (gRPC and HTTP/protobuf).

The sidecar is configured only through the standard ``OTEL_*`` variables
(plus the config file), serves a request whose first attempt fails, is
stopped with SIGTERM, and the spans must already be at the receiver when the
process has exited: drain flushes them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.support.otlp_receiver import GrpcOtlpReceiver, HttpOtlpReceiver, ReceivedSpan
from tests.support.process import SidecarProcess
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream

APP_TRACE = "0af7651916cd43dd8448eb211c80319c"
APP_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{APP_TRACE}-{APP_SPAN}-01"


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcOtlpReceiver]:
    receiver = GrpcOtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def http_receiver() -> Iterator[HttpOtlpReceiver]:
    receiver = HttpOtlpReceiver().start()
    yield receiver
    receiver.stop()


def traced_config(upstream_url: str, **tracing: Any) -> dict[str, Any]:
    config = base_config(upstream_url, name="orders", match={"path_prefix": "/v1/orders"})
    tracing.setdefault("redact_query_params", ["secret"])
    config["telemetry"] = {"tracing": {"enabled": True, **tracing}, "access_log": {"enabled": True}}
    return config


async def call(sidecar: SidecarProcess, path: str, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as client, client.get(sidecar.url + path, headers=headers) as resp:
        await resp.read()
        return resp.status


def by_kind(spans: list[ReceivedSpan], trace_id: str) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    (server,) = [s for s in spans if s.kind == "SERVER" and s.trace_id == trace_id]
    clients = sorted(
        (s for s in spans if s.kind == "CLIENT" and s.trace_id == trace_id),
        key=lambda s: s.attributes["outrigger.attempt"],
    )
    return server, clients


def assert_retried_trace(spans: list[ReceivedSpan], upstream: ScriptedUpstream, port: int) -> None:
    server, clients = by_kind(spans, APP_TRACE)
    assert server.name == "GET /v1/orders"  # {method} {http.route}, the route's path prefix
    assert server.attributes["http.route"] == "/v1/orders"
    assert server.attributes["url.query"] == "secret=REDACTED" and server.attributes["url.scheme"] == "http"
    assert server.parent_span_id == APP_SPAN  # the app's trace is continued
    attrs = server.attributes
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/v1/orders/17"
    assert attrs["http.response.status_code"] == 200
    assert (attrs["outrigger.route"], attrs["outrigger.upstream"], attrs["outrigger.attempt"]) == (
        "orders",
        "svc",
        2,
    )
    assert server.status == "UNSET"
    (backoff,) = [attrs for name, attrs in server.events if name == "backoff"]
    assert backoff["outrigger.reason"] == "http_503" and backoff["outrigger.attempt"] == 1
    assert backoff["outrigger.wait_s"] >= 0

    assert [c.parent_span_id for c in clients] == [server.span_id, server.span_id]
    first, second = clients
    for attempt, client in enumerate(clients, start=1):
        assert client.name == "GET"
        assert client.attributes["server.address"] == "127.0.0.1"
        assert client.attributes["server.port"] == port
        assert client.attributes["url.full"] == f"http://127.0.0.1:{port}/v1/orders/17?secret=REDACTED"
        assert client.attributes["network.peer.address"] == "127.0.0.1"
        assert client.attributes["outrigger.attempt"] == attempt
        assert (client.attributes["outrigger.route"], client.attributes["outrigger.upstream"]) == (
            "orders",
            "svc",
        )
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.request.resend_count"] == 1
    assert (first.attributes["http.response.status_code"], first.attributes["error.type"]) == (503, "503")
    assert first.status == "ERROR"
    assert second.attributes["http.response.status_code"] == 200 and second.status == "UNSET"
    assert "secret=1" not in json.dumps([s.attributes for s in spans])  # listed query values are redacted

    # Each attempt carried its own CLIENT span's context upstream.
    sent = [r.headers["traceparent"] for r in upstream.requests[:2]]
    assert sent == [f"00-{APP_TRACE}-{c.span_id}-01" for c in clients]


async def test_grpc_export_shows_the_retry_tree_with_resource_and_continues_the_app_trace(
    upstream: ScriptedUpstream, grpc_receiver: GrpcOtlpReceiver
) -> None:
    upstream.script(Reply(status=503), Reply(status=200))
    sidecar = await SidecarProcess(
        traced_config(upstream.url),
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_SERVICE_NAME": "checkout-sidecar",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test",
            "K8S_POD_NAME": "checkout-7d9f-abc12",
            "K8S_NAMESPACE_NAME": "shop",
        },
    ).start(within_s=10)
    try:
        assert await call(sidecar, "/v1/orders/17?secret=1", {"traceparent": TRACEPARENT}) == 200
        assert await call(sidecar, "/v1/orders/18") == 200  # no traceparent: a new root trace
    finally:
        assert await sidecar.stop(within_s=15) == 0
    spans = grpc_receiver.wait_for(lambda s: len(s) >= 5, timeout=0.5)  # flushed before exit
    assert len(spans) == 5
    assert_retried_trace(spans, upstream, upstream.port)

    (root,) = [s for s in spans if s.kind == "SERVER" and s.trace_id != APP_TRACE]
    assert root.parent_span_id == ""
    assert upstream.requests[2].headers["traceparent"].split("-")[1] == root.trace_id

    resource = spans[0].resource
    assert resource["service.name"] == "checkout-sidecar"
    assert resource["k8s.pod.name"] == "checkout-7d9f-abc12"
    assert resource["k8s.namespace.name"] == "shop"
    assert resource["deployment.environment"] == "test"
    assert all(s.scope == "outrigger" for s in spans)

    log = [json.loads(line) for line in sidecar.stdout().splitlines()]
    assert [(entry["trace_id"], entry["attempts"]) for entry in log] == [(APP_TRACE, 2), (root.trace_id, 1)]
    assert log[0]["span_id"] == by_kind(spans, APP_TRACE)[0].span_id


async def test_http_protobuf_export_shows_the_same_tree(
    upstream: ScriptedUpstream, http_receiver: HttpOtlpReceiver
) -> None:
    upstream.script(Reply(status=503), Reply(status=200))
    sidecar = await SidecarProcess(
        traced_config(upstream.url),
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": http_receiver.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        },
    ).start(within_s=10)
    try:
        assert await call(sidecar, "/v1/orders/17?secret=1", {"traceparent": TRACEPARENT}) == 200
    finally:
        assert await sidecar.stop(within_s=15) == 0
    spans = http_receiver.wait_for(lambda s: len(s) >= 3, timeout=0.5)
    assert len(spans) == 3
    assert_retried_trace(spans, upstream, upstream.port)
    assert spans[0].resource["service.name"] == "outrigger"
    assert set(http_receiver.content_types) == {"application/x-protobuf"}


async def test_config_endpoint_and_protocol_win_over_nothing_in_the_environment(
    upstream: ScriptedUpstream, http_receiver: HttpOtlpReceiver
) -> None:
    """``telemetry.tracing.endpoint``/``protocol`` alone are enough (no OTEL_* variables)."""
    config = traced_config(upstream.url, endpoint=http_receiver.endpoint, protocol="http/protobuf")
    config["telemetry"]["service_name"] = "from-config"
    sidecar = await SidecarProcess(config).start(within_s=10)
    try:
        assert await call(sidecar, "/v1/orders/1") == 200
    finally:
        assert await sidecar.stop(within_s=15) == 0
    spans = http_receiver.wait_for(lambda s: len(s) >= 2, timeout=0.5)
    assert {s.kind for s in spans} == {"SERVER", "CLIENT"}
    assert spans[0].resource["service.name"] == "from-config"


async def test_sample_ratio_zero_exports_nothing_but_a_sampled_parent_is_still_followed(
    upstream: ScriptedUpstream, grpc_receiver: GrpcOtlpReceiver
) -> None:
    sidecar = await SidecarProcess(
        traced_config(upstream.url, sample_ratio=0.0), env={"OTEL_EXPORTER_OTLP_ENDPOINT": grpc_receiver.endpoint}
    ).start(within_s=10)
    try:
        for _ in range(5):
            assert await call(sidecar, "/v1/orders/1") == 200
        unsampled_parent = f"00-{APP_TRACE}-{APP_SPAN}-00"
        assert await call(sidecar, "/v1/orders/2", {"traceparent": unsampled_parent}) == 200
        assert await call(sidecar, "/v1/orders/3", {"traceparent": TRACEPARENT}) == 200
    finally:
        assert await sidecar.stop(within_s=15) == 0
    spans = grpc_receiver.wait_for(lambda s: len(s) >= 2, timeout=0.5)
    assert sorted(s.kind for s in spans) == ["CLIENT", "SERVER"]
    assert {s.trace_id for s in spans} == {APP_TRACE}
    assert all(s.attributes.get("url.path", "/v1/orders/3") == "/v1/orders/3" for s in spans)
    # Unsampled requests still leave with a valid traceparent whose sampled flag is off: a new root,
    # or the app's trace continued under a new parent id.
    version, root_trace, _, flags = upstream.requests[0].headers["traceparent"].split("-")
    assert version == "00" and root_trace != APP_TRACE and int(flags, 16) & 1 == 0
    version, trace_id, parent_id, flags = upstream.requests[5].headers["traceparent"].split("-")
    assert (trace_id, int(flags, 16) & 1) == (APP_TRACE, 0) and parent_id != APP_SPAN
    log = [json.loads(line) for line in sidecar.stdout().splitlines()]
    assert [entry["trace_id"] for entry in log[:6]] == [None] * 6


@pytest.mark.parametrize("how", ["env", "config"])
async def test_b3_propagation_continues_b3_traces_and_injects_b3_upstream(
    upstream: ScriptedUpstream, grpc_receiver: GrpcOtlpReceiver, how: str
) -> None:
    b3_trace, b3_span = "80f198ee56343ba864fe8b2a57d3eff7", "e457b5a2e4d86bd1"
    if how == "env":
        config = traced_config(upstream.url)
        env = {"OTEL_PROPAGATORS": "tracecontext,baggage,b3"}
    else:
        config = traced_config(upstream.url)
        config["telemetry"]["propagators"] = ["tracecontext", "b3"]
        env = {"OTEL_PROPAGATORS": "none"}  # the config list wins over the environment
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = grpc_receiver.endpoint
    sidecar = await SidecarProcess(config, env=env).start(within_s=10)
    try:
        assert await call(sidecar, "/v1/orders/1", {"b3": f"{b3_trace}-{b3_span}-1"}) == 200
    finally:
        assert await sidecar.stop(within_s=15) == 0
    spans = grpc_receiver.wait_for(lambda s: len(s) >= 2, timeout=0.5)
    server, (client,) = by_kind(spans, b3_trace)
    assert server.parent_span_id == b3_span
    headers = upstream.requests[0].headers
    assert headers["b3"] == f"{b3_trace}-{client.span_id}-1"
    assert headers["traceparent"] == f"00-{b3_trace}-{client.span_id}-01"
