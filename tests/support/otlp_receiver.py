"""Real OTLP trace receivers on loopback.

``GrpcOtlpReceiver`` is a grpcio server implementing the collector's
``TraceService`` from the ``opentelemetry-proto`` service definitions;
``HttpOtlpReceiver`` accepts ``POST /v1/traces`` with a protobuf
``ExportTraceServiceRequest``, as an OTLP/HTTP collector does.  Both
flatten what they receive into ``ReceivedSpan`` records that tests assert
on.  Neither fakes the SDK: the sidecar's real exporter talks to them over
real sockets.  (``outrigger run`` as a subprocess: ``tests.support.process``.)
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

__all__ = [
    "GrpcOtlpReceiver",
    "HttpOtlpReceiver",
    "ReceivedSpan",
]

SPAN_KIND = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_CODE = {0: "UNSET", 1: "OK", 2: "ERROR"}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs if isinstance(kv, KeyValue)}


@dataclass
class ReceivedSpan:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status: str
    resource: dict[str, Any]
    scope: str

    def event_names(self) -> list[str]:
        return [name for name, _ in self.events]


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        kind=SPAN_KIND.get(span.kind, str(span.kind)),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=_attributes(span.attributes),
                        events=[(event.name, _attributes(event.attributes)) for event in span.events],
                        status=STATUS_CODE.get(span.status.code, str(span.status.code)),
                        resource=resource,
                        scope=scope_spans.scope.name,
                    )
                )
    return spans


@dataclass
class _Collected:
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    lock: threading.Condition = field(default_factory=threading.Condition)

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            self.requests += 1
            self.spans.extend(_flatten(request))
            self.lock.notify_all()

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float) -> list[ReceivedSpan]:
        """Block until ``predicate(spans)`` holds; return a snapshot either way."""
        with self.lock:
            self.lock.wait_for(lambda: predicate(self.spans), timeout)
            return list(self.spans)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collected: _Collected) -> None:
        self._collected = collected

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._collected.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class GrpcOtlpReceiver:
    """An OTLP/gRPC TraceService on 127.0.0.1; ``endpoint`` is ``http://127.0.0.1:PORT`` (insecure)."""

    def __init__(self) -> None:
        self.collected = _Collected()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            _TraceService(self.collected), self._server
        )
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def spans(self) -> list[ReceivedSpan]:
        return self.collected.wait_for(lambda _: True, 0)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        return self.collected.wait_for(predicate, timeout)

    def start(self) -> GrpcOtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    server: _HttpServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.server.content_types.append(self.headers.get("Content-Type", ""))
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.collected.add(request)
        payload = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    collected: _Collected
    content_types: list[str]


class HttpOtlpReceiver:
    """An OTLP/HTTP collector: ``POST /v1/traces`` with protobuf bodies; ``endpoint`` is the base URL."""

    def __init__(self) -> None:
        self.collected = _Collected()
        self._server = _HttpServer(("127.0.0.1", 0), _HttpHandler)
        self._server.collected = self.collected
        self._server.content_types = []
        self.port = int(self._server.server_address[1])
        # A short poll interval: stop() (shutdown) returns within it.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="otlp-http",
                                        daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def content_types(self) -> list[str]:
        return list(self._server.content_types)

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 10.0
    ) -> list[ReceivedSpan]:
        return self.collected.wait_for(predicate, timeout)

    def start(self) -> HttpOtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextlib.contextmanager
def running(*servers: GrpcOtlpReceiver | HttpOtlpReceiver) -> Iterator[None]:
    for server in servers:
        server.start()
    try:
        yield
    finally:
        for server in servers:
            server.stop()
