"""A minimal OTLP trace receiver for the benchmark (gRPC and HTTP/protobuf): it acknowledges every export.

It stands in for the OpenTelemetry Collector so that Outrigger's exporter does
its real work (batching, protobuf encoding, a gRPC call or an HTTP POST to
``/v1/traces``) against a peer that answers at once.  It counts the spans it
receives and writes the running totals as JSON to ``--stats`` so the
benchmark can check that traces arrived.

    python -m tests.bench.otlp_sink --port 4317 --http-port 4318 --stats /tmp/sink.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.exports = 0
        self.spans = 0

    def Export(self, request: Any, context: Any) -> Any:
        self.count(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def count(self, request: Any) -> None:
        count = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with self.lock:
            self.exports += 1
            self.spans += count

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {"exports": self.exports, "spans": self.spans}


def _http_handler(sink: Sink) -> type[BaseHTTPRequestHandler]:
    """OTLP/HTTP: ``POST /v1/traces`` with a protobuf ExportTraceServiceRequest."""
    reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/v1/traces":
                sink.count(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                self.send_response(200)
            else:
                self.send_response(404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def _write(path: str, data: dict[str, int]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http-port", type=int, help="also receive OTLP/HTTP (protobuf) on this port")
    parser.add_argument("--stats", required=True, help="file the span counts are written to")
    args = parser.parse_args()
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    http_server = None
    if args.http_port:
        http_server = ThreadingHTTPServer(("127.0.0.1", args.http_port), _http_handler(sink))
        threading.Thread(target=http_server.serve_forever, name="otlp-http", daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        _write(args.stats, sink.snapshot())
    server.stop(grace=None)
    if http_server is not None:
        http_server.shutdown()
    _write(args.stats, sink.snapshot())


if __name__ == "__main__":
    main()
