"""Real OTLP trace receivers on loopback, plus a helper that runs ``outrigger`` as a subprocess.

``GrpcOtlpReceiver`` is a grpcio server implementing the collector's
``TraceService`` from the ``opentelemetry-proto`` service definitions;
``HttpOtlpReceiver`` accepts ``POST /v1/traces`` with a protobuf
``ExportTraceServiceRequest``, as an OTLP/HTTP collector does.  Both
flatten what they receive into ``ReceivedSpan`` records that tests assert
on.  Neither fakes the SDK: the sidecar's real exporter talks to them over
real sockets.

``SidecarProcess`` starts ``python -m proxy run --config <file>`` (what
users run) and stops it with SIGTERM, returning its stdout (the access log)
and stderr (the JSON logs).
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc  # type: ignore[import-untyped]
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

__all__ = [
    "GrpcOtlpReceiver",
    "HttpOtlpReceiver",
    "ReceivedSpan",
    "SidecarProcess",
    "free_port",
]

SPAN_KIND = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_CODE = {0: "UNSET", 1: "OK", 2: "ERROR"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-http", daemon=True)

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


class SidecarProcess:
    """``python -m proxy run`` in a subprocess with free loopback ports chosen up front."""

    def __init__(self, config: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.admin_port = free_port()
        self.port = free_port()
        config = dict(config)
        config["admin"] = {"address": f"127.0.0.1:{self.admin_port}"}
        config["listeners"] = [dict(config["listeners"][0], address=f"127.0.0.1:{self.port}")]
        handle, self.config_path = tempfile.mkstemp(prefix="outrigger-", suffix=".yaml")
        with os.fdopen(handle, "w") as file:
            yaml.safe_dump(config, file)
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "K8S_"))}
        self.env = {**clean, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        # Files, not pipes: an unread pipe would fill up and block the sidecar's access log.
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self._err = tempfile.TemporaryFile()  # noqa: SIM115
        self.stdout = ""
        self.stderr = ""
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self, timeout: float = 10.0) -> SidecarProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", self.config_path],
            env=self.env,
            stdout=self._out,
            stderr=self._err,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"outrigger exited with {self.proc.returncode}: {self.stderr[-2000:]}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.admin_url + "/readyz", timeout=1) as response,
            ):
                if response.status == 200:
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"outrigger not ready after {timeout}s: {self.stderr[-2000:]}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (drain), wait, collect output; kill if it does not exit in ``timeout``."""
        if self.proc is None:
            return -1
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.returncode = self.proc.returncode
        self.stdout, self.stderr = self._read(self._out), self._read(self._err)
        with contextlib.suppress(OSError):
            os.unlink(self.config_path)
        return self.returncode

    @staticmethod
    def _read(file: Any) -> str:
        file.seek(0)
        return str(file.read().decode(errors="replace"))

    def metrics_text(self, accept: str | None = None) -> str:
        request = urllib.request.Request(
            self.admin_url + "/metrics", headers={"Accept": accept} if accept else {}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return str(response.read().decode())


@contextlib.contextmanager
def running(*servers: GrpcOtlpReceiver | HttpOtlpReceiver) -> Iterator[None]:
    for server in servers:
        server.start()
    try:
        yield
    finally:
        for server in servers:
            server.stop()
