"""``outrigger demo``: the flaky upstream, called directly and through the sidecar.

Starts the demo upstream and a sidecar (``demo.yaml``) on free loopback
ports, drives the same traffic at both for ``--duration``, shows progress,
then prints the comparison table, the sidecar's own metrics and one retried
request's trace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from importlib import resources

import aiohttp
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import load_config
from proxy.demo.upstream import FlakyBehaviour, start
from proxy.lifecycle.sidecar import Sidecar
from proxy.telemetry.metrics import Metrics

__all__ = ["run_demo"]


@dataclass
class Column:
    name: str
    latencies: list[float] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    attempts: int = 0

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def quantile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _caller(session: aiohttp.ClientSession, url: str, column: Column, stop_at: float, via_sidecar: bool) -> None:
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        start = time.perf_counter()
        try:
            async with session.get(f"{url}/orders/{n}", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                await resp.read()
                good = resp.status == 200
                column.attempts += int(resp.headers.get("x-outrigger-attempts", "1")) if via_sidecar else 1
        except (TimeoutError, aiohttp.ClientError):
            good = False
            column.attempts += 1
        column.latencies.append(time.perf_counter() - start)
        if good:
            column.ok += 1
        else:
            column.failed += 1
        await asyncio.sleep(0.01)


def _row(label: str, direct: str, sidecar: str) -> str:
    return f"  {label:<22}{direct:>16}{sidecar:>16}"


def _print_table(direct: Column, sidecar: Column) -> None:
    def rate(c: Column) -> str:
        return f"{100.0 * c.ok / c.total:.2f}%" if c.total else "-"

    print()
    print(_row("", "direct", "via outrigger"))
    print(_row("requests", str(direct.total), str(sidecar.total)))
    print(_row("success rate", rate(direct), rate(sidecar)))
    print(_row("failed requests", str(direct.failed), str(sidecar.failed)))
    print(_row("p50 latency", f"{direct.quantile(0.5) * 1000:.1f} ms", f"{sidecar.quantile(0.5) * 1000:.1f} ms"))
    print(_row("p99 latency", f"{direct.quantile(0.99) * 1000:.1f} ms", f"{sidecar.quantile(0.99) * 1000:.1f} ms"))
    def per(c: Column) -> str:
        return f"{c.attempts / c.total:.2f}" if c.total else "-"

    print(_row("upstream attempts/req", per(direct), per(sidecar)))


def _print_metrics(metrics: Metrics) -> None:
    from prometheus_client import generate_latest

    wanted = {"outrigger_requests", "outrigger_retries", "outrigger_upstream_attempts", "outrigger_timeouts",
              "outrigger_retry_budget_exhausted"}
    print("\nWhat the sidecar counted (GET /metrics on the admin port):")
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items() if k not in ("route", "upstream"))
                print(f"  {sample.name}{{{labels}}} {sample.value:g}")


def _print_trace(spans: tuple[ReadableSpan, ...]) -> None:
    by_trace: dict[int, list[ReadableSpan]] = {}
    for span in spans:
        by_trace.setdefault(span.context.trace_id, []).append(span)
    for trace_spans in by_trace.values():
        clients = [s for s in trace_spans if s.kind.name == "CLIENT"]
        servers = [s for s in trace_spans if s.kind.name == "SERVER"]
        if len(clients) < 2 or not servers:
            continue
        server = servers[0]
        print(f"\nOne retried request, as its trace (trace_id {server.context.trace_id:032x}):")
        status = (server.attributes or {}).get("http.response.status_code")
        print(f"  SERVER {server.name}  -> {status}")
        for event in server.events:
            if event.name in ("backoff", "retry_after_honoured"):
                wait = (event.attributes or {}).get("outrigger.wait_s", 0.0)
                print(f"    event {event.name} ({float(wait) * 1000:.1f} ms)")  # type: ignore[arg-type]
        for client in sorted(clients, key=lambda s: s.start_time or 0):
            attrs = client.attributes or {}
            result = attrs.get("http.response.status_code") or attrs.get("error.type")
            duration = ((client.end_time or 0) - (client.start_time or 0)) / 1e6
            print(f"    CLIENT {client.name} attempt {attrs.get('outrigger.attempt')} -> {result} ({duration:.1f} ms)")
        return


async def _demo(duration_s: float, concurrency: int, failure_rate: float) -> int:
    behaviour = FlakyBehaviour(failure_rate=failure_rate, reset_rate=0.03, latency_s=0.004, slow_rate=0.02,
                               slow_latency_s=1.5, rng=random.Random())
    upstream_runner, upstream_port = await start("127.0.0.1", 0, behaviour)
    text = resources.files("proxy.demo").joinpath("demo.yaml").read_text()
    env = dict(os.environ, DEMO_ADMIN="127.0.0.1:0", DEMO_LISTEN="127.0.0.1:0",
               DEMO_UPSTREAM_URL=f"http://127.0.0.1:{upstream_port}")
    config = load_config(text, source="demo.yaml", env=env)
    spans = InMemorySpanExporter()
    sidecar = Sidecar(config, span_exporter=spans)
    await sidecar.start()
    direct_url = f"http://127.0.0.1:{upstream_port}"
    sidecar_url = f"http://127.0.0.1:{sidecar.port('flaky')}"
    print(f"flaky upstream on {direct_url}: {failure_rate:.0%} 503s, 3% connection resets, 2% answers take 1.5s")
    print(f"outrigger on {sidecar_url} (admin http://127.0.0.1:{sidecar.admin_port}), config demo.yaml: "
          "attempt timeout 300ms, 4 attempts, full-jitter backoff, retry budget")
    print(f"driving {concurrency} callers direct and {concurrency} through the sidecar for {duration_s:g}s\n")
    direct, via = Column("direct"), Column("sidecar")
    stop_at = time.monotonic() + duration_s
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(_caller(session, direct_url, direct, stop_at, False)) for _ in range(concurrency)]
        tasks += [asyncio.create_task(_caller(session, sidecar_url, via, stop_at, True)) for _ in range(concurrency)]
        started = time.monotonic()
        # On a terminal one line is rewritten every second; into a file or pipe, a line every 5 seconds.
        live = sys.stdout.isatty()
        ticks = 0
        while not all(t.done() for t in tasks):
            await asyncio.sleep(1.0)
            ticks += 1
            elapsed = time.monotonic() - started
            progress = f"  [{elapsed:5.1f}s] direct: {direct.ok}/{direct.total} ok   " \
                       f"via outrigger: {via.ok}/{via.total} ok"
            if live:
                sys.stdout.write(f"\r{progress}   ")
            elif ticks % 5 == 0:
                sys.stdout.write(f"{progress}\n")
            sys.stdout.flush()
        await asyncio.gather(*tasks)
    if live:
        print()
    print()
    _print_table(direct, via)
    _print_metrics(sidecar.metrics)
    await sidecar.stop()
    _print_trace(spans.get_finished_spans())
    await upstream_runner.cleanup()
    print("\nNext: `PAYMENTS_UPSTREAM=http://<your-service>:<port> outrigger run --config config/outrigger.yaml`, "
          "then point your app at the listener (PAYMENTS_LISTEN, 127.0.0.1:15001); see docs/configuration-notes.md.")
    return 0 if via.total and via.ok / via.total >= direct.ok / max(1, direct.total) else 1


def run_demo(duration_s: float = 20.0, concurrency: int = 4, failure_rate: float = 0.2) -> int:
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)  # the demo's resets are on purpose
    return asyncio.run(_demo(duration_s, concurrency, failure_rate))
