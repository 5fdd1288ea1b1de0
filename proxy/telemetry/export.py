"""The span export path: the queue finished spans wait in, and the OTLP/HTTP exporter that ships them.

Where it sits: ``tracing.Tracing`` makes spans on the event loop
(``lean_span``: the OTel API's span, handing the SDK's ``ReadableSpan`` to
the span processors); when a sampled span ends, ``SpanQueue.on_end`` appends it to a deque
(one append, no lock taken on the loop).  One daemon thread wakes when a
batch is full or the schedule delay passes, and hands each batch to the
exporter (wrapped by ``export_health.ExportGuard`` for failure accounting).
``OtlpHttpExporter`` encodes the batch with ``otlp_wire`` and POSTs it over
one keep-alive connection.

Why not the SDK's ``BatchSpanProcessor`` and ``OTLPSpanExporter``: at 100%
sampling their export thread took a third of the process's CPU, and that
thread holds the GIL the event loop needs (see docs/benchmarks-tracing.md
for the measurements).  The API stays the SDK's; the wire format stays OTLP.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import http.client
import logging
import os
import random
import socket
import ssl
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Mapping, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from proxy.telemetry.otlp_wire import SpanEncoder

__all__ = ["OtlpHttpExporter", "SpanQueue", "grpc_exporter", "otlp_http_exporter"]

log = logging.getLogger("outrigger.tracing.export")

# The OTLP/HTTP spec's retryable answers; anything else is a permanent failure for the batch.
_RETRYABLE = frozenset({429, 502, 503, 504})
_MAX_ATTEMPTS = 6


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", name, raw, default)
        return default
    return value if value > 0 else default


class SpanQueue(SpanProcessor):
    """Batches sampled spans for one export thread; a full queue drops the new span and says so.

    Sizes come from the SDK's ``OTEL_BSP_*`` variables with the SDK's defaults
    (queue 2048, batch 512, delay 5000 ms).  ``on_end`` runs on the event loop:
    a deque append (atomic under the GIL) and, once per batch, an Event set.
    ``on_queue_full`` is called on the loop for each span dropped.
    """

    def __init__(self, exporter: SpanExporter, *, on_queue_full: Callable[[], None] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._exporter = exporter
        self._capacity = _env_int(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self._batch = min(self._capacity, _env_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512))
        self._delay_s = _env_int(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000.0
        self._on_queue_full = on_queue_full
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._export_lock = threading.Lock()  # the worker and force_flush never export at once
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="outrigger-span-export", daemon=True)
        self.sizes = (self._capacity, self._batch, self._delay_s)  # (queue, batch, delay seconds), as configured
        self._thread.start()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if self._closed or span.context is None or not span.context.trace_flags.sampled:
            return
        queue = self._queue
        if len(queue) >= self._capacity:
            if self._on_queue_full is not None:
                self._on_queue_full()
            return
        queue.append(span)
        if len(queue) >= self._batch and not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._export_all()
        self._export_all()  # shutdown: what is left goes out (the caller bounds how long it waits)

    def _export_all(self) -> None:
        queue, size = self._queue, self._batch
        with self._export_lock:
            while queue:
                batch = [queue.popleft() for _ in range(min(size, len(queue)))]
                try:
                    self._exporter.export(batch)
                except Exception:  # an exporter bug must not kill the export thread
                    log.exception("span export failed")

    def shutdown(self) -> None:
        """Export what is queued, then shut the exporter down; blocks until the thread is done."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join()
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        if self._closed:
            return False
        self._export_all()
        return True


class OtlpHttpExporter(SpanExporter):
    """OTLP/HTTP protobuf (``POST .../v1/traces``) over one keep-alive connection, retried with backoff.

    Retries follow the OTLP/HTTP spec: 429, 502, 503, 504 and connection
    errors, with exponential backoff (1 s, 2 s, ... with jitter, or the
    server's Retry-After) while the attempt fits in ``timeout_s``.
    ``shutdown`` wakes a backoff sleep and unblocks a request in flight, so a
    dead collector cannot hold the drain.
    """

    def __init__(self, endpoint: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 10.0,
                 compression: str = "none", ssl_context: ssl.SSLContext | None = None) -> None:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"OTLP/HTTP endpoint {endpoint!r} is not an http(s) URL")
        if compression not in ("none", "gzip", "deflate"):
            raise ValueError(f"OTLP compression {compression!r} is not one of none, gzip, deflate")
        self.endpoint = endpoint
        self._https = url.scheme == "https"
        self._host, self._port = url.hostname, url.port or (443 if self._https else 80)
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._headers = {"Content-Type": "application/x-protobuf", "User-Agent": "outrigger-otlp",
                         **(headers or {})}
        if compression != "none":
            self._headers["Content-Encoding"] = compression
        self._compression = compression
        self._timeout_s = timeout_s
        self._ssl = ssl_context or (ssl.create_default_context() if self._https else None)
        self._encoder = SpanEncoder()
        self._conn: http.client.HTTPConnection | None = None
        self._stop = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stop.is_set():
            return SpanExportResult.FAILURE
        body = self._encoder.encode(spans)
        if self._compression == "gzip":
            body = gzip.compress(body, compresslevel=6)
        elif self._compression == "deflate":
            body = zlib.compress(body)
        deadline = time.monotonic() + self._timeout_s
        for attempt in range(_MAX_ATTEMPTS):
            status, retry_after, error = self._post(body, deadline)
            if status is not None and 200 <= status < 300:
                return SpanExportResult.SUCCESS
            retryable = status in _RETRYABLE if status is not None else True
            what = f"HTTP {status}" if status is not None else error
            backoff = retry_after if retry_after is not None else 2 ** attempt * random.uniform(0.8, 1.2)
            if not retryable or attempt + 1 == _MAX_ATTEMPTS or time.monotonic() + backoff > deadline:
                log.warning("OTLP export to %s failed: %s", self.endpoint, what)
                return SpanExportResult.FAILURE
            log.warning("OTLP export to %s failed: %s; retrying in %.2fs", self.endpoint, what, backoff)
            if self._stop.wait(backoff):
                return SpanExportResult.FAILURE
        return SpanExportResult.FAILURE

    def _post(self, body: bytes, deadline: float) -> tuple[int | None, float | None, str | None]:
        """One POST: (status, Retry-After seconds, connection error); reconnects once on a stale connection."""
        for reuse in (True, False):
            conn = self._conn if reuse else None
            fresh = conn is None
            try:
                if conn is None:
                    conn = self._connect(max(0.1, deadline - time.monotonic()))
                conn.timeout = max(0.1, deadline - time.monotonic())
                if conn.sock is not None:
                    conn.sock.settimeout(conn.timeout)
                conn.request("POST", self._path, body, self._headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                if fresh or self._stop.is_set():
                    return None, None, f"{type(exc).__name__}: {exc}"
                continue  # the collector closed our idle keep-alive connection: one fresh try
            if response.will_close:
                self._drop_connection()
            retry_after = response.getheader("Retry-After")
            seconds = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
            return response.status, seconds, None
        return None, None, "connection failed"

    def _connect(self, timeout_s: float) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout_s, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout_s)
        conn.connect()
        if conn.sock is not None:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def shutdown(self) -> None:
        """Stop retrying and unblock a request in flight (its socket is shut down under it)."""
        self._stop.set()
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _headers(raw: str) -> dict[str, str]:
    """``OTEL_EXPORTER_OTLP_HEADERS`` syntax: comma-separated ``key=value``, URL-encoded."""
    out = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[urllib.parse.unquote(key.strip())] = urllib.parse.unquote(value.strip())
    return out


def otlp_http_exporter(endpoint: str | None, env: Mapping[str, str]) -> OtlpHttpExporter:
    """The exporter as the ``OTEL_EXPORTER_OTLP_*`` variables configure it (traces-specific ones win).

    ``endpoint`` (from the config) wins over the environment; a base URL gets ``/v1/traces``.
    """
    def setting(name: str) -> str:
        return env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or env.get(f"OTEL_EXPORTER_OTLP_{name}") or ""

    url = endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not url:
        url = (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318").rstrip("/") + "/v1/traces"
    elif endpoint and not url.rstrip("/").endswith("/v1/traces"):
        url = url.rstrip("/") + "/v1/traces"
    timeout_raw = setting("TIMEOUT")
    try:  # seconds, as the Python SDK's exporters read it (the spec says ms; we keep what users had)
        timeout_s = float(timeout_raw) if timeout_raw else 10.0
    except ValueError:
        timeout_s = 10.0
    context = None
    cafile, certfile, keyfile = setting("CERTIFICATE"), setting("CLIENT_CERTIFICATE"), setting("CLIENT_KEY")
    if url.startswith("https") and (cafile or certfile):
        context = ssl.create_default_context(cafile=cafile or None)
        if certfile:
            context.load_cert_chain(certfile, keyfile or None)
    compression = (setting("COMPRESSION") or "none").strip().lower()
    return OtlpHttpExporter(url, headers=_headers(setting("HEADERS")), timeout_s=timeout_s,
                            compression=compression if compression in ("gzip", "deflate") else "none",
                            ssl_context=context)


def grpc_exporter(endpoint: str | None) -> SpanExporter:
    """The SDK's OTLP/gRPC exporter (its channel, credentials, retries), fed by our encoder.

    ``_translate_data`` is the SDK exporters' own per-signal hook; overriding it
    replaces only the span-to-protobuf step, which becomes our wire bytes parsed
    once in C.  Should a future SDK rename the hook, the override goes unused and
    the SDK's encoder runs: slower, still correct.
    """
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    class _LeanGrpcExporter(OTLPSpanExporter):
        _encoder = SpanEncoder()

        def _translate_data(self, data: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
            request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(self._encoder.encode(data))
            return request

    return _LeanGrpcExporter(endpoint=endpoint) if endpoint else _LeanGrpcExporter()
