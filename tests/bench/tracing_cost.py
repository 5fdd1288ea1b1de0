"""Micro-benchmark: CPU per traced request in the loop thread and in the span export thread.

Issue 10, item 5.  Each variant runs in its own subprocess, in turn, repeated,
against one OTLP/HTTP sink (``otlp_sink.py``), so before and after are
measured side by side in one run::

    python -m tests.bench.tracing_cost                  # 20,000 requests x 3 rounds
    python -m tests.bench.tracing_cost --requests 5000 --repeat 1

A "request" is what the sidecar does for one sampled request: a SERVER span
with the edge's attributes and a CLIENT span for the attempt, both made with
the OTel SDK and ended.  The loop thread's CPU is ``time.thread_time()``; the
export thread's is the process CPU minus that, over the run and the flush at
shutdown, so every span is encoded and sent inside the window.

Variants:
  sdk        the SDK's BatchSpanProcessor + the SDK's OTLP/HTTP exporter (before)
  sdk-queue  our SpanQueue + the SDK's OTLP/HTTP exporter (the processor's share)
  lean       our SpanQueue + our OtlpHttpExporter (proxy/telemetry/export.py)
  lean-spans our spans (proxy/telemetry/lean_span.py) + SpanQueue + OtlpHttpExporter (what the sidecar runs)
  nospan     the same spans with no processor at all (the SDK span API alone)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support.ports import free_port

VARIANTS = ("nospan", "sdk", "sdk-queue", "lean", "lean-spans")


def _run_variant(variant: str, endpoint: str, requests: int) -> dict[str, Any]:
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanKind

    from proxy.telemetry.export import OtlpHttpExporter, SpanQueue
    from proxy.telemetry.lean_span import SpanFactory

    resource = Resource.create({"service.name": "bench", "k8s.pod.name": "p-1"})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    # A queue big enough for the whole run: every span is exported (none dropped), so the export
    # thread's figure is its cost for all of them, not for as many as it kept up with.
    queue = 2 * requests + 1
    env = {"OTEL_BSP_MAX_QUEUE_SIZE": str(queue)}
    if variant == "sdk":
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), max_queue_size=queue))
    elif variant == "sdk-queue":
        provider.add_span_processor(SpanQueue(OTLPSpanExporter(endpoint=endpoint), env=env))
    elif variant in ("lean", "lean-spans"):
        provider.add_span_processor(SpanQueue(OtlpHttpExporter(endpoint), env=env))
    tracer = provider.get_tracer("outrigger")
    factory = SpanFactory(resource, InstrumentationScope("outrigger"), None)
    lean_queue = SpanQueue(OtlpHttpExporter(endpoint), env=env) if variant == "lean-spans" else None
    if lean_queue is not None:
        factory.add_processor(lean_queue)

    def start(name: str, parent: trace.Span | None, kind: SpanKind, attributes: dict[str, Any]) -> trace.Span:
        if variant == "lean-spans":
            return factory.start(name, parent.get_span_context() if parent is not None else None, kind, attributes)
        context = trace.set_span_in_context(parent) if parent is not None else None
        return tracer.start_span(name, context=context, kind=kind, attributes=attributes)

    process0, thread0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
    for i in range(requests):
        server = start("GET", None, SpanKind.SERVER, {})
        path = f"/items/{i % 50}"
        client = start("GET", server, SpanKind.CLIENT, {
            "http.request.method": "GET", "url.full": "http://up:8080" + path, "url.path": path,
            "server.address": "up", "server.port": 8080, "outrigger.route": "default", "outrigger.upstream": "up",
            "outrigger.attempt": 1})
        client.set_attribute("http.response.status_code", 200)
        client.end()
        server.update_name("GET default")
        server.set_attributes({"http.request.method": "GET", "url.path": path,
                               "url.full": "http://127.0.0.1:15001" + path, "server.address": "127.0.0.1",
                               "server.port": 15001, "http.response.status_code": 200,
                               "outrigger.route": "default", "outrigger.upstream": "up", "outrigger.attempt": 1})
        server.end()
    loop_s = time.thread_time() - thread0
    provider.shutdown()  # flushes: every span is exported inside the measured window
    if lean_queue is not None:
        lean_queue.shutdown()
    total_s = time.process_time() - process0
    return {"variant": variant, "requests": requests, "spans": 2 * requests, "loop_s": loop_s,
            "export_s": max(0.0, total_s - loop_s), "wall_s": time.perf_counter() - wall0}


def encoding_cost(batch: int = 512, rounds: int = 20) -> dict[str, float]:
    """µs of CPU per span to encode a batch of real finished spans: the SDK's encoder vs ``otlp_wire``."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind

    from proxy.telemetry.otlp_wire import SpanEncoder

    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("outrigger")
    for i in range(batch // 2):
        server = tracer.start_span("GET default", kind=SpanKind.SERVER)
        path = f"/items/{i % 50}"
        tracer.start_span("GET", context=trace.set_span_in_context(server), kind=SpanKind.CLIENT,
                          attributes={"http.request.method": "GET", "url.path": path, "server.port": 8080,
                                      "outrigger.route": "default", "outrigger.attempt": 1}).end()
        server.set_attributes({"http.request.method": "GET", "url.path": path, "http.response.status_code": 200,
                               "outrigger.route": "default", "outrigger.attempt": 1})
        server.end()
    spans = memory.get_finished_spans()
    encoder = SpanEncoder()
    out = {}
    for name, encode in (("sdk", lambda: sdk_encode(spans).SerializePartialToString()),
                         ("otlp_wire", lambda: encoder.encode(spans))):
        encode()
        start = time.process_time()
        for _ in range(rounds):
            encode()
        out[name] = 1e6 * (time.process_time() - start) / rounds / len(spans)
    return out


def _sink_spans(stats: Path) -> int:
    try:
        return int(json.loads(stats.read_text())["spans"])
    except (OSError, ValueError, KeyError):
        return 0


def _wait_sink(stats: Path, at_least: int, limit_s: float = 10.0) -> int:
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if _sink_spans(stats) >= at_least:
            break
        time.sleep(0.1)
    return _sink_spans(stats)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_variant"]:
        print(json.dumps(_run_variant(argv[1], argv[2], int(argv[3]))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.bench.tracing_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--output", help="also write the JSON results here")
    parser.add_argument("--encoding", action="store_true",
                        help="only the encoder: µs per span for a 512-span batch, SDK vs otlp_wire")
    args = parser.parse_args(argv)
    if args.encoding:
        costs = encoding_cost()
        print(" | ".join(f"{name}: {value:.1f} µs/span" for name, value in costs.items())
              + f" | ratio {costs['otlp_wire'] / costs['sdk']:.2f}x")
        return 0
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="outrigger-tracing-cost-") as tmp:
        stats = Path(tmp) / "sink.json"
        port, http_port = free_port(), free_port()
        sink = subprocess.Popen([sys.executable, "-m", "tests.bench.otlp_sink", "--port", str(port),
                                 "--http-port", str(http_port), "--stats", str(stats)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            endpoint = f"http://127.0.0.1:{http_port}/v1/traces"
            runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
            for round_ in range(args.repeat):
                for variant in variants:  # interleaved, so machine noise hits every variant alike
                    before = _sink_spans(stats)
                    out = subprocess.run([sys.executable, "-m", "tests.bench.tracing_cost", "_variant", variant,
                                          endpoint, str(args.requests)], capture_output=True, text=True,
                                         check=True, env={**os.environ})
                    result = json.loads(out.stdout)
                    expected = 0 if variant == "nospan" else result["spans"]
                    result["received"] = _wait_sink(stats, before + expected, 10.0 if expected else 0.5) - before
                    runs[variant].append(result)
                    print(f"round {round_ + 1} {variant:10s} loop {1e6 * result['loop_s'] / result['requests']:6.1f}"
                          f" us/req  export {1e6 * result['export_s'] / result['requests']:6.1f} us/req  "
                          f"received {result['received']}/{expected}", file=sys.stderr, flush=True)
        finally:
            sink.terminate()
            sink.wait()
    summary = _summary(runs)
    print(_table(summary, args.requests, args.repeat))
    if args.output:
        Path(args.output).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")
    return 0


def _summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for variant, results in runs.items():
        loop = [1e6 * r["loop_s"] / r["requests"] for r in results]
        export = [1e6 * r["export_s"] / r["requests"] for r in results]
        total = [a + b for a, b in zip(loop, export, strict=True)]
        out[variant] = {"loop_us": statistics.median(loop), "export_us": statistics.median(export),
                        "total_us": statistics.median(total), "total_min": min(total), "total_max": max(total)}
    return out


def _table(summary: dict[str, dict[str, float]], requests: int, repeat: int) -> str:
    base = summary.get("sdk", {}).get("total_us")
    lines = [f"CPU per traced request (2 spans), median of {repeat} rounds x {requests:,} requests, "
             "µs", "", "| variant | loop thread | export thread | total (min-max) | x sdk |",
             "|---|---:|---:|---:|---:|"]
    for variant, s in summary.items():
        ratio = f"{s['total_us'] / base:.2f}x" if base else "—"
        lines.append(f"| {variant} | {s['loop_us']:.1f} | {s['export_us']:.1f} | {s['total_us']:.1f} "
                     f"({s['total_min']:.1f}-{s['total_max']:.1f}) | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
