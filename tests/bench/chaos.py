"""Chaos benchmark: the resilience policies against a misbehaving upstream, measured against the issue's goals.

One command, not part of pytest (``tests/bench`` is in ``norecursedirs``)::

    python -m tests.bench.chaos                # every scenario, about 75 s
    python -m tests.bench.chaos --only storm   # one scenario

The sidecar runs as its own process (``python -m proxy run``), as users run
it, so it has a core to itself; the load generator and the chaos upstream
share this process.  Load is open-loop: request *i* is due at
``start + i / rps`` whether or not earlier ones have finished, and latency is
measured from that due time, so a stalled proxy cannot hide its stall by
slowing the generator down (no coordinated omission).  In-flight requests are
capped (``MAX_INFLIGHT``); a request that would exceed the cap is counted as
dropped, never silently delayed.  All traffic stays on 127.0.0.1.

It prints one table (each figure beside its goal, PASS/FAIL) and writes
``tests/bench/results/chaos.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.support.ports import free_port

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[2]
MAX_INFLIGHT = 2000
RPS = 200


# --- the chaos upstream -------------------------------------------------------------------------


Behaviour = Callable[[random.Random], tuple[int, float]]  # -> (status, delay before headers)


def healthy(rng: random.Random) -> tuple[int, float]:
    return 200, 0.0


def down(rng: random.Random) -> tuple[int, float]:
    return 503, 0.0


class LoopbackUpstream:
    """A bare aiohttp server on a loopback port the OS picks; a subclass answers in ``_handle``."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._web: web.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        raise NotImplementedError

    async def start(self) -> None:
        self._web = web.Server(self._handle, access_log=None)
        self._server = await asyncio.get_running_loop().create_server(self._web, "127.0.0.1", 0, backlog=2048)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._web is not None:
            await self._web.shutdown(0.1)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)


class ChaosUpstream(LoopbackUpstream):
    """A loopback upstream whose behaviour can be swapped mid-run; it logs every arrival time."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.rng = random.Random(seed)
        self.behaviour: Behaviour = healthy
        self.arrivals: list[float] = []

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        self.arrivals.append(time.monotonic())
        status, delay = self.behaviour(self.rng)
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, body=b"ok" if status < 400 else b"unavailable")

    def hits_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.arrivals if start <= t < end)


# --- the sidecar, as a separate process ---------------------------------------------------------


class SidecarProcess:
    """``python -m proxy run`` (the code under ``repo``) on free loopback ports: one route, ``chaos``, to ``svc``."""

    def __init__(self, upstream_url: str, route: dict[str, Any], upstream: dict[str, Any] | None = None, *,
                 repo: Path = REPO) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.repo = repo
        self.config: dict[str, Any] = {
            "version": 1,
            "admin": {"address": f"127.0.0.1:{self.admin_port}"},
            "drain": {"grace": "0s", "timeout": "1s"},
            "upstreams": {"svc": {"url": upstream_url, **(upstream or {})}},
            "listeners": [{"name": "main", "address": f"127.0.0.1:{self.port}",
                           "routes": [{"name": "chaos", "upstream": "svc", **route}]}],
            "telemetry": {"tracing": {"enabled": False}, "access_log": {"enabled": False}},
        }
        self._dir = tempfile.TemporaryDirectory(prefix="outrigger-chaos-")
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/chaos"

    async def start(self, session: aiohttp.ClientSession) -> None:
        path = Path(self._dir.name) / "outrigger.yaml"
        path.write_text(yaml.safe_dump(self.config))
        env = {**os.environ, "PYTHONPATH": str(self.repo)}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "run", "--config", str(path), "--log-level", "warning",
            cwd=self.repo, env=env, stdout=asyncio.subprocess.DEVNULL)
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(f"http://127.0.0.1:{self.admin_port}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError("sidecar did not become ready within 15 s")

    async def status(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"http://127.0.0.1:{self.admin_port}/status") as resp:
            data: dict[str, Any] = await resp.json()
            return data

    def cpu_s(self) -> float:
        """User + system CPU seconds of the sidecar process so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self._dir.cleanup()


# --- open-loop load -----------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    due: float  # monotonic time the request was scheduled for
    latency: float  # seconds from `due` to the end of the response body
    status: int  # 0 when the client itself failed
    error: str | None  # x-outrigger-error, or the client exception name


@dataclass
class Load:
    samples: list[Sample] = field(default_factory=list)
    offered: int = 0
    dropped: int = 0
    start: float = 0.0
    end: float = 0.0


async def offer(session: aiohttp.ClientSession, url: str, rps: float, duration: float,
                on_tick: Callable[[float], None] | None = None) -> Load:
    """Send ``rps * duration`` GETs on an open-loop schedule and record every outcome."""
    load = Load()
    loop = asyncio.get_running_loop()
    inflight: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        try:
            async with session.get(url) as resp:
                await resp.read()
                load.samples.append(Sample(due, time.monotonic() - due, resp.status,
                                           resp.headers.get("x-outrigger-error")))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            load.samples.append(Sample(due, time.monotonic() - due, 0, type(exc).__name__))

    total = int(rps * duration)
    load.start = time.monotonic() + 0.02
    for i in range(total):
        due = load.start + i / rps
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if on_tick is not None:
            on_tick(due)
        load.offered += 1
        if len(inflight) >= MAX_INFLIGHT:
            load.dropped += 1
            continue
        task = loop.create_task(one(due))
        inflight.add(task)
        task.add_done_callback(inflight.discard)
    load.end = load.start + total / rps
    if inflight:
        await asyncio.wait(inflight, timeout=15.0)
    return load


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation), q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


# --- scenarios ----------------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    figure: str
    measured: float
    goal: float
    unit: str
    higher_is_better: bool = False

    @property
    def passed(self) -> bool:
        if math.isnan(self.measured):
            return False
        return self.measured >= self.goal if self.higher_is_better else self.measured <= self.goal


@dataclass
class Result:
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class Bench:
    def __init__(self, session: aiohttp.ClientSession, seed: int) -> None:
        self.session = session
        self.seed = seed
        self.last_outcomes: Counter[str] = Counter()

    async def offer(self, url: str, rps: float, duration: float,
                    on_tick: Callable[[float], None] | None = None) -> Load:
        load = await offer(self.session, url, rps, duration, on_tick)
        self.last_outcomes.update(f"{s.status} {s.error or ''}".strip() for s in load.samples)
        return load

    async def _with(self, route: dict[str, Any], upstream_cfg: dict[str, Any] | None,
                    run: Callable[[ChaosUpstream, SidecarProcess], Awaitable[Result]]) -> Result:
        upstream = ChaosUpstream(self.seed)
        await upstream.start()
        sidecar = SidecarProcess(upstream.url, route, upstream_cfg)
        try:
            await sidecar.start(self.session)
            async with self.session.get(sidecar.url) as resp:  # warm one pooled connection each way
                await resp.read()
            upstream.arrivals.clear()
            self.last_outcomes.clear()
            result = await run(upstream, sidecar)
            return result
        finally:
            await sidecar.stop()
            await upstream.stop()

    async def transient(self) -> Result:
        """20% of upstream answers are 503, at random; default retries."""
        def flaky(rng: random.Random) -> tuple[int, float]:
            return (503 if rng.random() < 0.2 else 200), 0.0

        async def run(upstream: ChaosUpstream, sidecar: SidecarProcess) -> Result:
            upstream.behaviour = flaky
            load = await self.offer(sidecar.url, RPS, 10.0)
            ok = sum(1 for s in load.samples if s.status == 200)
            success = ok / load.offered
            amplification = len(upstream.arrivals) / load.offered
            return Result([
                Row("transient 503s (20%)", "client success", success * 100, 99.0, "%", higher_is_better=True),
                Row("transient 503s (20%)", "upstream load / requests", amplification, 1.3, "x"),
            ], {"offered": load.offered, "ok": ok, "upstream_attempts": len(upstream.arrivals),
                "dropped": load.dropped, "p99_ms": percentile([s.latency for s in load.samples], 99) * 1000})

        # At 20% independent errors, 5 failures in a row (the default trip) happen about once per
        # 3,000 attempts, i.e. every ~13 s at this load; a transient-error route wants a breaker that
        # trips on a real outage, so this scenario raises the threshold to 10 (about once per 10^7).
        return await self._with({"retry": {"max_attempts": 3}}, {"circuit_breaker": {"consecutive_failures": 10}},
                                run)

    async def outage(self) -> Result:
        """Healthy 2 s, every answer 503 for 10 s, healthy again for 5 s; at a steady 200 rps."""
        open_max = 2.0
        breaker = {"consecutive_failures": 5, "open_duration": {"min": "1s", "max": f"{open_max:g}s"}}
        marks: dict[str, float] = {}

        async def run(upstream: ChaosUpstream, sidecar: SidecarProcess) -> Result:
            def tick(due: float) -> None:
                elapsed = due - load_start[0]
                if "outage" not in marks and elapsed >= 2.0:
                    marks["outage"] = time.monotonic()
                    upstream.behaviour = down
                if "heal" not in marks and elapsed >= 12.0:
                    marks["heal"] = time.monotonic()
                    upstream.behaviour = healthy

            load_start = [time.monotonic() + 0.02]
            load = await self.offer(sidecar.url, RPS, 17.0, on_tick=tick)
            t_out, t_heal = marks["outage"], marks["heal"]
            fast = [s for s in load.samples if s.error == "circuit_open"]
            first_open = min((s.due for s in fast if s.due >= t_out), default=math.nan)
            opened_after = first_open - t_out
            offered_open = sum(1 for s in load.samples if first_open <= s.due < t_heal)
            hits_open = upstream.hits_between(first_open, t_heal)
            after = sorted((s for s in load.samples if s.due >= t_heal), key=lambda s: s.due)
            failures = [s for s in after if s.status != 200]
            recovered = (failures[-1].due + 1.0 / RPS - t_heal) if failures else 0.0
            fast_p99 = percentile([s.latency for s in fast], 99) * 1000
            return Result([
                Row("full outage (10 s)", "breaker opened after", opened_after * 1000, 1000.0, "ms"),
                Row("full outage (10 s)", "upstream share while open", hits_open / max(1, offered_open) * 100,
                    5.0, "%"),
                Row("full outage (10 s)", "fast-fail p99", fast_p99, 5.0, "ms"),
                Row("full outage (10 s)", "full success after heal", recovered, open_max + 1.0, "s"),
            ], {"offered": load.offered, "dropped": load.dropped, "fast_fails": len(fast),
                "fast_fail_p50_ms": percentile([s.latency for s in fast], 50) * 1000,
                "offered_while_open": offered_open, "upstream_hits_while_open": hits_open,
                "open_duration": {"min_s": 1.0, "max_s": open_max}})

        return await self._with({"retry": {"max_attempts": 3}}, {"circuit_breaker": breaker}, run)

    async def spike(self) -> Result:
        """10% of answers take 5 s; attempt 200 ms, total 1 s, default retries."""
        def spiky(rng: random.Random) -> tuple[int, float]:
            return 200, (5.0 if rng.random() < 0.1 else 0.0)

        async def run(upstream: ChaosUpstream, sidecar: SidecarProcess) -> Result:
            upstream.behaviour = spiky
            load = await self.offer(sidecar.url, RPS, 10.0)
            latencies = [s.latency for s in load.samples]
            ok = sum(1 for s in load.samples if s.status == 200)
            return Result([
                Row("latency spike (10% x 5 s)", "client p99", percentile(latencies, 99) * 1000, 450.0, "ms"),
            ], {"offered": load.offered, "dropped": load.dropped, "ok": ok,
                "p50_ms": percentile(latencies, 50) * 1000, "p90_ms": percentile(latencies, 90) * 1000,
                "p999_ms": percentile(latencies, 99.9) * 1000, "upstream_attempts": len(upstream.arrivals)})

        route = {"timeout": {"attempt": "200ms", "total": "1s"}, "retry": {"max_attempts": 3}}
        return await self._with(route, None, run)

    async def storm(self) -> Result:
        """Every answer 503, no breaker: only the retry budget stands between the app and a storm."""
        duration, min_per_second = 10.0, 10.0

        async def run(upstream: ChaosUpstream, sidecar: SidecarProcess) -> Result:
            upstream.behaviour = down
            load = await self.offer(sidecar.url, RPS, duration)
            attempts = len(upstream.arrivals)
            goal = 1.2 * load.offered + min_per_second * duration
            return Result([
                Row("retry storm (100% 503)", "upstream attempts", attempts, goal, "req"),
            ], {"offered": load.offered, "dropped": load.dropped, "attempts_per_request": attempts / load.offered})

        route = {"retry": {"max_attempts": 3, "budget": {"ratio": 0.2, "min_per_second": min_per_second,
                                                         "window": "10s"}}}
        return await self._with(route, {"circuit_breaker": {"enabled": False}}, run)

    async def rate(self) -> Result:
        """100 rps configured, 200 rps offered for 10 s."""
        async def run(upstream: ChaosUpstream, sidecar: SidecarProcess) -> Result:
            load = await self.offer(sidecar.url, RPS, 10.0)
            accepted = sum(1 for s in load.samples if s.status == 200)
            limited = sum(1 for s in load.samples if s.status == 429)
            rate = accepted / (load.end - load.start)
            return Result([
                Row("rate accuracy (100 rps)", "accepted rate error", abs(rate - 100.0), 3.0, "%"),
            ], {"offered": load.offered, "dropped": load.dropped, "accepted": accepted, "rate_limited": limited,
                "accepted_rps": rate})

        return await self._with({"rate_limit": {"requests_per_second": 100, "burst": 10}}, None, run)


SCENARIOS = ("transient", "outage", "spike", "storm", "rate")


def render(rows: list[Row]) -> str:
    header = f"{'scenario':<28} {'figure':<28} {'measured':>12} {'goal':>14}  result"
    lines = [header, "-" * len(header)]
    for row in rows:
        sign = ">=" if row.higher_is_better else "<="
        measured = f"{row.measured:.3g} {row.unit}" if row.unit != "req" else f"{row.measured:.0f}"
        goal = f"{sign} {row.goal:g} {row.unit}" if row.unit != "req" else f"{sign} {row.goal:.0f}"
        lines.append(f"{row.scenario:<28} {row.figure:<28} {measured:>12} {goal:>14}  "
                     f"{'PASS' if row.passed else 'FAIL'}")
    return "\n".join(lines)


async def run_scenarios(only: list[str], run: Callable[[aiohttp.ClientSession, str], Awaitable[Result]],
                        ) -> tuple[list[Row], dict[str, Any]]:
    """``run(session, name)`` for each scenario named, timed, each with a fresh client (no keep-alive
    connection outlives the sidecar it was made to): all rows, and the details by scenario."""
    rows: list[Row] = []
    details: dict[str, Any] = {}
    for name in only:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            result = await run(session, name)
            result.details["wall_s"] = round(time.monotonic() - started, 1)
            rows.extend(result.rows)
            details[name] = result.details
        gc.collect()
        await asyncio.sleep(0.2)
    return rows, details


async def main(only: list[str], seed: int) -> int:
    load_before = os.getloadavg()  # the figures are latencies: a busy machine shows in them

    async def run(session: aiohttp.ClientSession, name: str) -> Result:
        bench = Bench(session, seed)
        result: Result = await getattr(bench, name)()
        result.details["outcomes"] = dict(bench.last_outcomes)
        return result

    rows, details = await run_scenarios(only, run)
    return write_report("chaos.json", rows, details, load_before, {"offered_rps": RPS, "seed": seed})


def write_report(file_name: str, rows: list[Row], details: dict[str, Any], load_before: tuple[float, float, float],
                 extra: dict[str, Any]) -> int:
    """Print the table, write ``results/<file_name>``; the exit code: 0 when every goal passed."""
    print(render(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        **extra,
        "rows": [{**asdict(row), "passed": row.passed} for row in rows],
        "details": details,
    }
    (RESULTS / file_name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {RESULTS / file_name}", file=sys.stderr)
    return 0 if all(row.passed for row in rows) else 1


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=SCENARIOS, help="run just this scenario (repeatable)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the upstream's random failures")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(main(args.only or list(SCENARIOS), args.seed))


if __name__ == "__main__":
    sys.exit(cli())
