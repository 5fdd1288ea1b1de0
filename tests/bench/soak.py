"""Soak: hundreds of thousands of requests through ``outrigger run`` across every policy path.

The mix (by request index modulo 10): 5 plain successes, 2 through a route
whose upstream fails every other call with 503 (retried), 2 through a
rate-limited route (some 429), 1 to an upstream that always answers 500 (its
breaker opens, half-opens and reopens: 500s and 503 ``circuit_open``).

Checks: RSS growth from the first checkpoint to the end stays within 5%;
after the load the open FD count and the asyncio task count (read through
the SIGUSR1 probe of ``tests.support.process``) are back at their baseline;
every response is one the mix can produce (no 502/504, no client errors).

``python -m tests.bench.soak`` runs the full 300k (checkpoint at 100k), writes
tests/bench/results/soak.json and exits 1 when a check fails.  It is a benchmark,
not part of the default test run (it was 55% of it and ran into the pytest
timeout on a busy machine); run it before a release and after changes to the
pool, the edge or anything that holds per-request state.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.process import SidecarProcess

RESULTS = Path(__file__).parent / "results" / "soak.json"
CONCURRENCY = 32
MIX = ("/ok", "/ok", "/flaky", "/ok", "/limited", "/ok", "/flaky", "/ok", "/limited", "/broken")
EXPECTED = {("/ok", 200), ("/flaky", 200), ("/flaky", 503), ("/limited", 200), ("/limited", 429),
            ("/broken", 500), ("/broken", 503)}


class MixUpstream:
    """/ok 200; /flaky 503 on every other call; /broken 500 always."""

    def __init__(self) -> None:
        self._flaky = itertools.count()
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        path = request.path
        if path.startswith("/broken"):
            return web.Response(status=500, text="broken")
        if path.startswith("/flaky") and next(self._flaky) % 2 == 0:
            return web.Response(status=503, text="busy")
        return web.Response(text="ok")

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def soak_config(url: str) -> dict[str, Any]:
    timeout = {"connect": "1s", "attempt": "2s", "total": "5s", "idle": "5s"}
    return {
        "version": 1,
        "admin": {"address": "127.0.0.1:0"},
        "drain": {"grace": "0s", "timeout": "5s"},
        "defaults": {"timeout": timeout, "retry": {"backoff": {"base": "1ms", "max": "5ms"}}},
        "upstreams": {
            "svc": {"url": url, "idle_timeout": "500ms"},
            "bad": {"url": url, "idle_timeout": "500ms",
                    "circuit_breaker": {"consecutive_failures": 5, "open_duration": {"min": "200ms", "max": "1s"}}},
        },
        "listeners": [{"name": "main", "address": "127.0.0.1:0", "routes": [
            {"name": "ok", "match": {"path_prefix": "/ok"}, "upstream": "svc"},
            {"name": "retry", "match": {"path_prefix": "/flaky"}, "upstream": "svc",
             # the budget would otherwise (rightly) stop retrying half the calls
             "retry": {"max_attempts": 3, "budget": {"ratio": 1.0, "min_per_second": 10000}}},
            {"name": "limited", "match": {"path_prefix": "/limited"}, "upstream": "svc",
             "rate_limit": {"requests_per_second": 200, "burst": 50}},
            {"name": "breaker", "match": {"path_prefix": "/broken"}, "upstream": "bad", "retry": {"max_attempts": 1}},
        ]}],
        "telemetry": {"tracing": {"enabled": False}, "access_log": {"enabled": False}},
    }


async def run_soak(total: int, checkpoint: int, directory: Path | None = None) -> dict[str, Any]:
    """Run ``total`` requests; RSS is compared between ``checkpoint`` requests and the end."""
    upstream = MixUpstream()
    url = await upstream.start()
    sidecar = await SidecarProcess(soak_config(url), task_probe=True, directory=directory).start()
    try:
        async with aiohttp.ClientSession() as session:
            for path in MIX:  # warm up every path once
                async with session.get(sidecar.url + path) as resp:
                    await resp.read()
        await asyncio.sleep(1.0)
        base_fds, base_tasks, base_rss = sidecar.fd_count(), await sidecar.task_count(), sidecar.rss_bytes()

        counts: collections.Counter[tuple[str, int]] = collections.Counter()
        errors: collections.Counter[str] = collections.Counter()
        issued = itertools.count()
        rss: dict[int, int] = {}
        started = time.monotonic()

        async def worker(session: aiohttp.ClientSession) -> None:
            while (index := next(issued)) < total:
                if index == checkpoint:
                    rss[checkpoint] = sidecar.rss_bytes()
                path = MIX[index % len(MIX)]
                try:
                    async with session.get(sidecar.url + path) as resp:
                        await resp.read()
                        counts[(path, resp.status)] += 1
                except aiohttp.ClientError as exc:
                    errors[type(exc).__name__] += 1

        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
        elapsed = time.monotonic() - started
        rss[total] = sidecar.rss_bytes()
        fds, tasks = await sidecar.settle(base_fds, base_tasks)
        exit_code = await sidecar.stop()
    finally:
        await sidecar.kill()
        await upstream.stop()
    growth = (rss[total] - rss[checkpoint]) / rss[checkpoint]
    return {
        "requests": total,
        "seconds": round(elapsed, 1),
        "requests_per_second": round(total / elapsed),
        "concurrency": CONCURRENCY,
        "rss_mib": {"baseline": round(base_rss / 2**20, 2), **{str(k): round(v / 2**20, 2) for k, v in rss.items()}},
        "rss_growth_pct": round(growth * 100, 2),
        "fds": {"baseline": base_fds, "after": fds},
        "tasks": {"baseline": base_tasks, "after": tasks},
        "responses": {f"{path} {status}": n for (path, status), n in sorted(counts.items())},
        "unexpected": sorted(f"{p} {s}" for p, s in counts if (p, s) not in EXPECTED),
        "client_errors": dict(errors),
        "exit_code": exit_code,
    }


def check(result: dict[str, Any]) -> list[str]:
    """The soak's pass conditions; an empty list means it passed."""
    problems = []
    if result["rss_growth_pct"] > 5:
        problems.append(f"RSS grew {result['rss_growth_pct']}% after the checkpoint")
    if result["fds"]["after"] > result["fds"]["baseline"]:
        problems.append(f"FDs {result['fds']}")
    if result["tasks"]["after"] > result["tasks"]["baseline"]:
        problems.append(f"tasks {result['tasks']}")
    if result["unexpected"] or result["client_errors"]:
        problems.append(f"unexpected responses {result['unexpected']} / errors {result['client_errors']}")
    paths = {key.split(" ")[0] + " " + key.split(" ")[1] for key in result["responses"]}
    for needed in ("/flaky 200", "/limited 429", "/broken 503"):  # each policy path was exercised
        if needed not in paths:
            problems.append(f"no {needed} responses: the mix did not reach that path")
    if result["exit_code"] != 0:
        problems.append(f"exit code {result['exit_code']}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300_000)
    parser.add_argument("--checkpoint", type=int, default=100_000)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        result = asyncio.run(run_soak(args.requests, args.checkpoint, Path(directory)))
    result["problems"] = check(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
