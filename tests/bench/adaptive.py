"""Adaptive-policies benchmark: the goals of issue 16, each figure a ratio against a baseline route of the same run.

One command, not part of pytest::

    python -m tests.bench.adaptive                   # every scenario, about 2.5 minutes
    python -m tests.bench.adaptive --only tail       # one scenario (repeatable)
    python -m tests.bench.adaptive --scale 0.5       # shorter phases (a busy machine)

One sidecar process (``python -m proxy run``) per scenario carries a baseline route and the
treatment routes side by side, each to its own loopback upstream with the same behaviour and
seed, under the same open-loop load at the same time: machine noise hits both alike.  The load
generator and the upstreams share this process (see ``chaos.py`` for the open-loop method).
Prints one table and writes ``tests/bench/results/adaptive.json`` and ``adaptive.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.bench.chaos import (
    REPO,
    RESULTS,
    ChaosUpstream,
    Load,
    LoopbackUpstream,
    Result,
    Row,
    SidecarProcess,
    offer,
    percentile,
    render,
    run_scenarios,
)

RPS = 100  # per route


# --- upstream behaviours --------------------------------------------------------------------------


def fast(rng: random.Random) -> tuple[int, float]:
    return 200, rng.uniform(0.005, 0.015)


def tail(rng: random.Random) -> tuple[int, float]:
    """0.5% of answers take 1 s, the rest 5-15 ms."""
    return 200, (1.0 if rng.random() < 0.005 else rng.uniform(0.005, 0.015))


def slower(rng: random.Random) -> tuple[int, float]:
    return 200, 3 * rng.uniform(0.005, 0.015)


def all_slow(rng: random.Random) -> tuple[int, float]:
    return 200, rng.uniform(0.2, 0.3)


class CongestedUpstream(LoopbackUpstream):
    """Serves 16 at 100 ms; past 16 in flight every answer slows (+10% per extra), past 20 it sheds with 503."""

    KNEE, SHED, SERVICE_S = 16, 20, 0.1

    def __init__(self) -> None:
        super().__init__()
        self.inflight = 0
        self.served: list[tuple[float, float]] = []  # (end time, service seconds) of 200s
        self.shed = 0

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        if request.path == "/__stats":
            return web.json_response({"served": self.served, "shed": self.shed})
        if self.inflight >= self.SHED:
            self.shed += 1
            return web.Response(status=503, body=b"overloaded")
        self.inflight += 1
        start = time.monotonic()
        try:
            # Set at arrival (one timer, so the bench's own event-loop lag does not compound it).
            await asyncio.sleep(self.SERVICE_S * (1.0 + 0.1 * max(0, self.inflight - self.KNEE)))
        finally:
            self.inflight -= 1
        end = time.monotonic()
        self.served.append((time.time(), end - start))  # wall clock: comparable across processes
        return web.Response(status=200, body=b"ok")

    @staticmethod
    async def serve(port_file: str) -> None:
        """Run in its own process (``--serve-congested``), so the callers' event loop cannot slow it."""
        upstream = CongestedUpstream()
        await upstream.start()
        Path(port_file).write_text(str(upstream.port))  # noqa: ASYNC240 (once, at start-up)
        await asyncio.Event().wait()


class CongestedProcess:
    """A ``CongestedUpstream`` in a child process; its figures are read over HTTP at the end."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="outrigger-congested-")
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        port_file = Path(self._dir.name) / "port"
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.bench.adaptive", "--serve-congested", str(port_file),
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        for _ in range(300):
            if port_file.exists() and port_file.read_text():
                self.port = int(port_file.read_text())
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("congested upstream did not start")

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.url}/__stats") as resp:
            data: dict[str, Any] = await resp.json()
            return data

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        self._dir.cleanup()


# --- one sidecar, several routes ------------------------------------------------------------------


class Sidecar(SidecarProcess):
    """chaos's sidecar process with a route per upstream instead of its one route (path ``/<name>``)."""

    def __init__(self, routes: dict[str, tuple[str, Any, Any]], repo: Path = REPO) -> None:
        super().__init__("", {}, repo=repo)
        self.config["upstreams"] = {name: {"url": url, **upstream} for name, (url, _, upstream) in routes.items()}
        self.config["listeners"][0]["routes"] = [
            {"name": name, "upstream": name, "match": {"path_prefix": f"/{name}"}, **route}
            for name, (_, route, _) in routes.items()]

    def route_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    async def metric(self, session: aiohttp.ClientSession, prefix: str) -> dict[str, float]:
        """Samples of the sidecar's /metrics whose line starts with ``prefix``."""
        async with session.get(f"http://127.0.0.1:{self.admin_port}/metrics") as resp:
            text = await resp.text()
        return {line.rpartition(" ")[0]: float(line.rpartition(" ")[2]) for line in text.splitlines()
                if line.startswith(prefix)}


def p999(load: Load) -> float:
    return percentile([s.latency for s in load.samples], 99.9)


def outcomes(load: Load) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sample in load.samples:
        key = f"{sample.status} {sample.error or ''}".strip()
        counts[key] = counts.get(key, 0) + 1
    return counts


def success(load: Load) -> float:
    return sum(1 for s in load.samples if s.status == 200) / max(1, load.offered)


class Bench:
    def __init__(self, session: aiohttp.ClientSession, seed: int, scale: float) -> None:
        self.session = session
        self.seed = seed
        self.scale = scale

    async def _upstreams(self, names: list[str], behaviour: Callable[[random.Random], tuple[int, float]]
                         ) -> dict[str, ChaosUpstream]:
        ups = {}
        for name in names:
            up = ChaosUpstream(self.seed)
            up.behaviour = behaviour
            await up.start()
            ups[name] = up
        return ups

    async def _phase(self, sidecar: Sidecar, names: list[str], seconds: float,
                     on_tick: Callable[[float], None] | None = None) -> dict[str, Load]:
        loads = await asyncio.gather(*(offer(self.session, sidecar.route_url(name), RPS, seconds * self.scale,
                                             on_tick if i == 0 else None) for i, name in enumerate(names)))
        return dict(zip(names, loads, strict=True))

    async def tail(self) -> tuple[list[Row], dict[str, Any]]:
        """0.5% of answers take 1 s: fixed attempt 2 s vs adaptive timeout vs hedge at auto."""
        names = ["fixed", "adaptive", "hedge"]
        ups = await self._upstreams(names, tail)
        routes = {"fixed": {}, "adaptive": {"timeout": {"attempt": "2s", "adaptive": {}}},
                  "hedge": {"hedge": {"delay": "auto"}}}
        sidecar = Sidecar({n: (ups[n].url, routes[n], {}) for n in names})
        try:
            await sidecar.start(self.session)
            await self._phase(sidecar, names, 8.0)  # warm-up: the sketches fill
            for up in ups.values():
                up.arrivals.clear()
            loads = await self._phase(sidecar, names, 30.0)
            status = await sidecar.status(self.session)
            hedge_counts = await sidecar.metric(self.session, "outrigger_hedges_total")
        finally:
            await sidecar.stop()
            for up in ups.values():
                await up.stop()
        load_x = {n: len(ups[n].arrivals) / loads[n].offered for n in names}
        base = p999(loads["fixed"])
        rows = [
            Row("0.5% x 1 s tail", "adaptive p99.9 / fixed", p999(loads["adaptive"]) / base, 0.25, "x"),
            Row("0.5% x 1 s tail", "adaptive load / fixed", load_x["adaptive"] / load_x["fixed"], 1.05, "x"),
            Row("0.5% x 1 s tail", "hedge p99.9 / fixed", p999(loads["hedge"]) / base, 0.25, "x"),
            Row("0.5% x 1 s tail", "hedges / requests", (load_x["hedge"] - 1) * 100, 5.0, "%"),
        ]
        details: dict[str, Any] = {n: {"offered": loads[n].offered, "success": success(loads[n]),
                                       "outcomes": outcomes(loads[n]),
                                       "p50_ms": percentile([s.latency for s in loads[n].samples], 50) * 1000,
                                       "p99_ms": percentile([s.latency for s in loads[n].samples], 99) * 1000,
                                       "p999_ms": p999(loads[n]) * 1000, "upstream_per_request": load_x[n]}
                                   for n in names}
        details["hedges_total"] = hedge_counts
        details["learned"] = {n: status["routes"][n].get(part) for n, part in
                              (("adaptive", "adaptive_timeout"), ("hedge", "hedge"))}
        return rows, details

    async def slowdown(self) -> tuple[list[Row], dict[str, Any]]:
        """Every answer 3x slower for good, 5 s in: how fast the adaptive timeout follows; success."""
        names = ["fixed", "adaptive"]
        ups = await self._upstreams(names, fast)
        routes = {"fixed": {}, "adaptive": {"timeout": {"attempt": "2s", "adaptive": {}}}}
        sidecar = Sidecar({n: (ups[n].url, routes[n], {}) for n in names})
        marks: dict[str, float] = {}
        trace: list[tuple[float, float]] = []

        def tick(due: float) -> None:
            if "change" not in marks and due - start >= 5.0 * self.scale:
                marks["change"] = time.monotonic()
                for up in ups.values():
                    up.behaviour = slower

        async def poll() -> None:
            while True:
                learned = (await sidecar.status(self.session))["routes"]["adaptive"]["adaptive_timeout"]
                trace.append((time.monotonic(), learned["timeout_s"]))
                await asyncio.sleep(0.25)

        try:
            await sidecar.start(self.session)
            await self._phase(sidecar, names, 5.0)  # warm-up
            start = time.monotonic()
            poller = asyncio.get_running_loop().create_task(poll())
            loads = await self._phase(sidecar, names, 20.0, tick)
            poller.cancel()
        finally:
            await sidecar.stop()
            for up in ups.values():
                await up.stop()
        change = marks["change"]
        before = [v for t, v in trace if t < change]
        # Followed: the learned value covers what the new answers need, 0.9 x multiplier x their p99
        # (3 x 14.9 ms, from the upstream's own distribution; what a noiseless machine settles at).
        target = 0.9 * 2 * 3 * (0.005 + 0.99 * 0.010)
        followed = next((t - change for t, v in trace if t >= change and v >= target), math.nan)
        rows = [
            Row("3x slower for good", "adaptive timeout follows in", followed, 10.0, "s"),
            Row("3x slower for good", "adaptive success", success(loads["adaptive"]) * 100, 99.9, "%",
                higher_is_better=True),
            Row("3x slower for good", "adaptive / fixed success", success(loads["adaptive"]) /
                max(1e-9, success(loads["fixed"])), 0.999, "x", higher_is_better=True),
        ]
        return rows, {"timeout_before_s": before[-1], "timeout_after_s": trace[-1][1], "target_s": target,
                      "success": {n: success(loads[n]) for n in names},
                      "outcomes": {n: outcomes(loads[n]) for n in names},
                      "p99_ms": {n: percentile([s.latency for s in loads[n].samples], 99) * 1000 for n in names}}

    async def outage(self) -> tuple[list[Row], dict[str, Any]]:
        """Everything slow (200-300 ms) from 5 s in, hedging after 50 ms: only max_extra_load holds the load.

        A fixed delay is the worst case for the cap: at ``auto`` the delay follows the slowdown within
        a few dozen samples and hedging stops by itself."""
        names = ["fixed", "hedge"]
        ups = await self._upstreams(names, fast)
        routes = {"fixed": {}, "hedge": {"hedge": {"delay": "50ms", "max_extra_load": 0.05}}}
        sidecar = Sidecar({n: (ups[n].url, routes[n], {}) for n in names})
        marks: dict[str, float] = {}

        def tick(due: float) -> None:
            if "slow" not in marks and due - start >= 5.0 * self.scale:
                marks["slow"] = due
                for up in ups.values():
                    up.behaviour = all_slow

        try:
            await sidecar.start(self.session)
            await self._phase(sidecar, names, 10.0)  # warm-up: the sketch learns the fast latencies
            start = time.monotonic()
            loads = await self._phase(sidecar, names, 15.0, tick)
        finally:
            await sidecar.stop()
            for up in ups.values():
                await up.stop()
        slow = marks["slow"]
        extra = {}
        for n in names:
            requests = sum(1 for s in loads[n].samples if s.due >= slow)
            extra[n] = ups[n].hits_between(slow, math.inf) / max(1, requests) - 1
        rows = [Row("all slow, hedging on", "hedge extra load", extra["hedge"] * 100, 6.0, "%"),
                Row("all slow, hedging on", "extra load vs fixed", (extra["hedge"] - extra["fixed"]) * 100, 6.0,
                    "%")]
        return rows, {"extra_load": extra, "success": {n: success(loads[n]) for n in names},
                      "outcomes": {n: outcomes(loads[n]) for n in names}}

    async def concurrency(self) -> tuple[list[Row], dict[str, Any]]:
        """64 closed-loop callers on an upstream that degrades past 16 concurrent: fixed vs AIMD."""
        names = ["fixed", "aimd"]
        ups = {n: CongestedProcess() for n in names}
        for up in ups.values():
            await up.start()
        # No breaker on either: its 503 trips would hide what the concurrency limit does.
        upstream_cfg = {"fixed": {"concurrency": {"max_active": 100}, "circuit_breaker": {"enabled": False}},
                        "aimd": {"concurrency": {"max_active": 100, "adaptive": {"initial": 20, "min": 4}},
                                 "circuit_breaker": {"enabled": False}}}
        sidecar = Sidecar({n: (ups[n].url, {}, upstream_cfg[n]) for n in names})
        seconds = 15.0 * self.scale
        results: dict[str, list[tuple[float, int, float]]] = {n: [] for n in names}

        async def caller(name: str, until: float) -> None:
            while time.monotonic() < until:
                start = time.monotonic()
                try:
                    async with self.session.get(sidecar.route_url(name)) as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, OSError, TimeoutError):
                    status = 0
                results[name].append((start, status, time.monotonic() - start))
                if status != 200:
                    await asyncio.sleep(0.1)  # a caller backs off a little after an error

        limits: list[tuple[float, int]] = []

        async def poll() -> None:
            while True:
                await asyncio.sleep(0.25)
                limits.append((time.monotonic(), (await sidecar.status(self.session))["upstreams"]["aimd"]
                               .get("concurrency_limit", 0)))

        try:
            await sidecar.start(self.session)
            begin = time.monotonic()
            poller = asyncio.get_running_loop().create_task(poll())
            await asyncio.gather(*(caller(n, begin + seconds) for n in names for _ in range(64)))
            poller.cancel()
            status = await sidecar.status(self.session)
            stats = {n: await ups[n].stats(self.session) for n in names}
        finally:
            await sidecar.stop()
            for up in ups.values():
                await up.stop()
        measured_from = begin + seconds / 3  # the first third lets AIMD settle
        wall_from = time.time() - (time.monotonic() - measured_from)
        capacity = CongestedUpstream.KNEE / CongestedUpstream.SERVICE_S
        figures: dict[str, dict[str, float]] = {}
        for n in names:
            span = begin + seconds - measured_from
            served = [d for end, d in stats[n]["served"] if end >= wall_from]
            calls = [r for r in results[n] if r[0] >= measured_from]
            figures[n] = {
                "goodput_share": len(served) / span / capacity,
                "admitted_p99_ratio": percentile(served, 99) / CongestedUpstream.SERVICE_S,
                "client_success": sum(1 for r in calls if r[1] == 200) / max(1, len(calls)),
                "client_p99_ms": percentile([r[2] for r in calls], 99) * 1000,
                "upstream_503s": float(stats[n]["shed"]),
                "upstream_mean_inflight": sum(served) / span,  # Little's law over the measured span
            }
        rows = [
            Row("degrades past 16, 64 callers", "aimd goodput / capacity", figures["aimd"]["goodput_share"] * 100,
                90.0, "%", higher_is_better=True),
            Row("degrades past 16, 64 callers", "aimd admitted p99 / uncong.", figures["aimd"]["admitted_p99_ratio"],
                2.0, "x"),
            Row("degrades past 16, 64 callers", "fixed goodput / capacity", figures["fixed"]["goodput_share"] * 100,
                math.nan, "%", higher_is_better=True),
            Row("degrades past 16, 64 callers", "fixed admitted p99 / uncong.",
                figures["fixed"]["admitted_p99_ratio"], math.nan, "x"),
        ]
        measured = [limit for t, limit in limits if t >= measured_from]
        return rows, {**figures, "learned_limit": status["upstreams"]["aimd"].get("concurrency_limit"),
                      "aimd_limit_mean": sum(measured) / max(1, len(measured)),
                      "aimd_limit_range": [min(measured, default=0), max(measured, default=0)]}

    async def cost(self) -> tuple[list[Row], dict[str, Any]]:
        """Sidecar CPU per request, none configured (this code and the code before it) and each policy on."""
        base = _before_tree()
        ups = await self._upstreams(["u"], lambda rng: (200, 0.0))
        routes: dict[str, dict[str, Any]] = {
            "plain": {}, "adaptive": {"timeout": {"adaptive": {}}}, "hedge": {"hedge": {"delay": "auto"}},
            "aimd": {}}
        upstream_cfg = {"aimd": {"concurrency": {"max_active": 100, "adaptive": {}}}}
        sidecar = Sidecar({n: (ups["u"].url, routes[n], upstream_cfg.get(n, {})) for n in routes})
        before = Sidecar({"plain": (ups["u"].url, {}, {})}, repo=base)
        samples: dict[str, list[float]] = {}
        try:
            await sidecar.start(self.session)
            await before.start(self.session)
            runs = [(sidecar, n, n) for n in routes] + [(before, "plain", "plain (before)")]
            for proc, name, _ in runs:
                await self._closed_loop(proc, name, 0.5)  # warm-up
            for _ in range(3):  # interleaved rounds: drift in the machine's load hits every variant alike
                for proc, name, key in runs:
                    cpu = proc.cpu_s()
                    count = await self._closed_loop(proc, name, 1.5 * self.scale)
                    samples.setdefault(key, []).append((proc.cpu_s() - cpu) / count * 1e6)
        finally:
            await sidecar.stop()
            await before.stop()
            await ups["u"].stop()
        per_request = {key: sorted(values)[1] for key, values in samples.items()}  # the median of three
        plain = per_request["plain"]
        rows = [Row("cost per request", "none on: this / before", plain / per_request["plain (before)"], 1.1, "x")]
        rows += [Row("cost per request", f"{n}: CPU vs none on", per_request[n] - plain, math.nan, "us")
                 for n in ("adaptive", "hedge", "aimd")]
        return rows, {"cpu_us_per_request": per_request, "rounds": samples}

    async def _closed_loop(self, sidecar: Sidecar, name: str, seconds: float, callers: int = 8) -> int:
        count = 0
        until = time.monotonic() + seconds

        async def one() -> None:
            nonlocal count
            while time.monotonic() < until:
                async with self.session.get(sidecar.route_url(name)) as resp:
                    await resp.read()
                count += 1

        await asyncio.gather(*(one() for _ in range(callers)))
        return count


def _before_tree() -> Path:
    """The code this branch started from (its merge base with main), exported to a temp directory."""
    base = subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    target = Path(tempfile.gettempdir()) / f"outrigger-before-{base[:12]}"
    if not target.exists():
        target.mkdir()
        archive = subprocess.run(["git", "archive", base], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


SCENARIOS = ("tail", "slowdown", "outage", "concurrency", "cost")


def markdown(rows: list[Row], details: dict[str, Any], header: dict[str, Any]) -> str:
    lines = ["# Adaptive policies benchmark (`python -m tests.bench.adaptive`)", "",
             f"Generated {header['generated_at']}; {header['machine']['cpus']} CPUs shared with other jobs "
             f"(load average {header['machine']['loadavg_before'][0]:.1f} before, "
             f"{header['machine']['loadavg_after'][0]:.1f} after); scale {header['scale']}, seed {header['seed']}.",
             "Every ratio is against the baseline route of the same sidecar, loaded at the same time.", "",
             "| scenario | figure | measured | goal | result |", "|---|---|---|---|---|"]
    for row in rows:
        sign = ">=" if row.higher_is_better else "<="
        goal = "report" if math.isnan(row.goal) else f"{sign} {row.goal:g} {row.unit}"
        result = "-" if math.isnan(row.goal) else ("PASS" if row.passed else "FAIL")
        lines.append(f"| {row.scenario} | {row.figure} | {row.measured:.3g} {row.unit} | {goal} | {result} |")
    lines += ["", "Details:", "", "```json", json.dumps(details, indent=1, default=float), "```", ""]
    return "\n".join(lines)


async def main(only: list[str], seed: int, scale: float) -> int:
    load_before = os.getloadavg()

    async def run(session: aiohttp.ClientSession, name: str) -> Result:
        return Result(*await getattr(Bench(session, seed, scale), name)())

    rows, details = await run_scenarios(only, run)
    print(render([r for r in rows if not math.isnan(r.goal)]))
    header = {"generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": seed, "scale": scale,
              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adaptive.json").write_text(json.dumps(
        {**header, "rows": [{**asdict(r), "passed": r.passed} for r in rows], "details": details},
        indent=2, default=float) + "\n")
    (RESULTS / "adaptive.md").write_text(markdown(rows, details, header))
    print(f"\nwrote {RESULTS / 'adaptive.md'}", file=sys.stderr)
    return 0 if all(r.passed for r in rows if not math.isnan(r.goal)) else 1


def cli() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=SCENARIOS, help="run just this scenario (repeatable)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the upstreams' random latencies")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every phase's duration")
    parser.add_argument("--serve-congested", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop
        uvloop.install()
    if args.serve_congested:
        asyncio.run(CongestedUpstream.serve(args.serve_congested))
        return 0
    return asyncio.run(main(args.only or list(SCENARIOS), args.seed, args.scale))


if __name__ == "__main__":
    sys.exit(cli())
