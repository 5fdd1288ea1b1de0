"""SERVER and CLIENT spans follow the stable OpenTelemetry HTTP semantic conventions (real sockets)."""

from __future__ import annotations

from typing import Any

import aiohttp
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy import __version__
from proxy.lifecycle.sidecar import Sidecar
from tests.support.sidecar import base_config
from tests.support.upstream import ScriptedUpstream


class AtStart(SpanProcessor):
    """Keeps each span's attributes as they were when it was created (what a sampler could see)."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, Any]] = {}

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        self.seen[f"{span.context.span_id:016x}"] = dict(span.attributes or {})

    def on_end(self, span: ReadableSpan) -> None:
        pass


async def traced(sidecar_factory: Any, upstream: ScriptedUpstream, **route: Any) -> tuple[Sidecar, InMemorySpanExporter,
                                                                                           AtStart]:
    config = base_config(upstream.url, name="api", match={"path_prefix": "/api"}, **route)
    config["telemetry"]["tracing"] = {"enabled": True, "sample_ratio": 1.0, "redact_query_params": ["token"]}
    exporter = InMemorySpanExporter()
    # the sidecar's own batch exporter is a throwaway: the test reads spans as they end, from `exporter`
    sidecar = await sidecar_factory(config, env={}, span_exporter=InMemorySpanExporter())
    at_start = AtStart()
    assert sidecar.tracing.provider is not None
    sidecar.tracing.provider.add_span_processor(at_start)
    sidecar.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
    return sidecar, exporter, at_start


def spans(exporter: InMemorySpanExporter, kind: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind.name == kind]


async def test_server_and_client_spans_carry_the_conventions_attributes_from_creation(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    sidecar, exporter, at_start = await traced(sidecar_factory, upstream)
    port = sidecar.port("main")
    async with client.get(f"http://127.0.0.1:{port}/api/items?q=1&sig=abc&Token=t0&x=%20",
                          headers={"User-Agent": "app/1.0"}) as resp:
        assert resp.status == 200
    (server,) = spans(exporter, "SERVER")
    (out,) = spans(exporter, "CLIENT")
    attrs = dict(server.attributes or {})
    assert server.name == "GET /api" and attrs["http.route"] == "/api"
    start = {
        "http.request.method": "GET", "url.scheme": "http", "url.path": "/api/items",
        "url.query": "q=1&sig=REDACTED&Token=REDACTED&x=%20", "server.address": "127.0.0.1", "server.port": port,
        "client.address": "127.0.0.1", "network.peer.address": "127.0.0.1", "network.protocol.version": "1.1",
        "user_agent.original": "app/1.0",
    }
    assert {key: at_start.seen[f"{server.context.span_id:016x}"].get(key) for key in start} == start
    assert {key: attrs.get(key) for key in start} == start
    assert attrs["http.response.status_code"] == 200 and server.status.status_code.name == "UNSET"
    client_attrs = dict(out.attributes or {})
    assert out.name == "GET"
    assert client_attrs["url.full"] == f"{upstream.url.rstrip('/')}/api/items?q=1&sig=REDACTED&Token=REDACTED&x=%20"
    assert client_attrs["network.peer.address"] == "127.0.0.1"
    assert client_attrs["network.protocol.version"] == "1.1"
    assert server.instrumentation_scope is not None and server.instrumentation_scope.version == __version__
    assert server.resource.attributes["service.version"] == __version__


async def test_a_non_standard_method_is_other_with_the_original_kept_and_the_span_named_http(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    sidecar, exporter, _ = await traced(sidecar_factory, upstream)
    async with client.request("PURGE", f"http://127.0.0.1:{sidecar.port('main')}/api/x") as resp:
        assert resp.status == 200
    (server,) = spans(exporter, "SERVER")
    (out,) = spans(exporter, "CLIENT")
    for span, name in ((server, "HTTP /api"), (out, "HTTP")):
        assert span.name == name
        assert (span.attributes or {})["http.request.method"] == "_OTHER"
        assert (span.attributes or {})["http.request.method_original"] == "PURGE"


async def test_outriggers_own_4xx_leave_the_server_span_status_unset_and_5xx_set_error(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    sidecar, exporter, _ = await traced(sidecar_factory, upstream, retry={"max_attempts": 1})
    base = f"http://127.0.0.1:{sidecar.port('main')}"
    async with client.get(f"{base}/nowhere") as resp:
        assert resp.status == 404  # no_route
    async with client.get(f"{base}/api/x", headers={"x-outrigger-timeout-ms": "soon"}) as resp:
        assert resp.status == 400  # bad_request
    await upstream.stop()  # now every attempt fails to connect: a 5xx of Outrigger's own
    async with client.get(f"{base}/api/x") as resp:
        assert resp.status >= 500
    by_status = {(s.attributes or {})["http.response.status_code"]: s for s in spans(exporter, "SERVER")}
    for status, outcome in ((404, "no_route"), (400, "bad_request")):
        span = by_status[status]
        assert span.status.status_code.name == "UNSET" and "error.type" not in (span.attributes or {})
        assert (span.attributes or {})["outrigger.outcome"] == outcome
    (failed,) = [s for code, s in by_status.items() if isinstance(code, int) and code >= 500]
    assert failed.status.status_code.name == "ERROR" and (failed.attributes or {})["error.type"]
