"""The benchmark's goal tables: issue 10's figures, each a ratio measured in one run, with its spread.

``bench.py`` measures every target once per round (``--repeat N`` rounds, all
targets in each, so each ratio compares figures taken minutes apart, never
hours).  Here each goal's figure is computed per round, and the table gives
the median with the minimum and maximum over the rounds.  A goal is met when
its median meets it; "never below 2.5x" goals also need every round.  The
memory goal comes from the first round only (the rounds after it do not
drive the 300k requests again).  Issue 6's earlier goals are kept below,
from the first round, so a regression against them shows too.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.bench.bench import Settings, TargetResult

Round = dict[str, "TargetResult"]


@dataclass(slots=True)
class Goal:
    figure: str
    goal: str
    target: str
    value: str
    met: bool | None
    issue: int = 10
    runs: list[float] = field(default_factory=list)  # the figure in each round that had it


def num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "—" if value is None else fmt.format(value)


def ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base == 0:
        return "—"
    return f"{value / base:.2f}x"


def rps(result: TargetResult | None) -> float | None:
    return result.throughput.rps if result is not None and result.throughput is not None else None


def per_core(result: TargetResult | None) -> float | None:
    """Requests per CPU-second of the proxy's own processes (all threads) in the throughput run.

    The same as req/s for a proxy that saturates its core; for one that does
    not (a C peer held back by the load generator on the other core) it is what
    a whole core of it would serve, so a comparison against it is never flattered.
    """
    if result is None or not result.cpu_s_per_1k:
        return None
    return 1000.0 / result.cpu_s_per_1k


def added(result: TargetResult | None, direct: TargetResult | None, attr: str) -> float | None:
    if result is None or result.key == "direct" or direct is None or result.latency is None \
            or direct.latency is None:
        return None
    value, base = getattr(result.latency, attr), getattr(direct.latency, attr)
    return None if value is None or base is None else value - base


def spread(values: Sequence[float], fmt: str) -> str:
    if not values:
        return "—"
    middle = fmt.format(statistics.median(values))
    if len(values) == 1:
        return middle
    return f"{middle} ({fmt.format(min(values))}-{fmt.format(max(values))}, {len(values)} runs)"


def _per_round(rounds: Sequence[Round], figure: Callable[[Round], float | None]) -> list[float]:
    return [v for v in (figure(r) for r in rounds) if v is not None]


def _ratio_goal(rounds: Sequence[Round], name: str, goal: str, target: str,
                figure: Callable[[Round], float | None], need: float, floor: float | None = None,
                at_most: bool = False) -> Goal:
    runs = _per_round(rounds, figure)
    if not runs:
        return Goal(name, goal, target, "—", None)
    median = statistics.median(runs)
    met = median <= need if at_most else median >= need
    if floor is not None:
        met = met and min(runs) >= floor
    return Goal(name, goal, target, spread(runs, "{:.2f}x"), met, runs=runs)


def evaluate(rounds: Sequence[Round], settings: Settings) -> list[Goal]:
    """Issue 10's goals over every round, then issue 6's from the first."""
    goals: list[Goal] = []

    def over(key: str, base: str, fn: Callable[[TargetResult | None], float | None] = per_core
             ) -> Callable[[Round], float | None]:
        def figure(r: Round) -> float | None:
            value, reference = fn(r.get(key)), fn(r.get(base))
            return None if value is None or not reference else value / reference
        return figure

    target = "outrigger-1"
    goals.append(_ratio_goal(rounds, "throughput per core, all policies, 1% tracing, vs Envoy (retries + "
                             "outlier detection)", "≥ 1.0x", target, over(target, "envoy"), 1.0))
    goals.append(_ratio_goal(rounds, "the same, vs the naive aiohttp proxy", "≥ 3x, never < 2.5x", target,
                             over(target, "naive"), 3.0, floor=2.5))
    goals.append(_ratio_goal(rounds, "the same, as a share of the raw-Protocol pass-through", "≥ 0.55", target,
                             over(target, "raw"), 0.55))
    goals.append(_ratio_goal(rounds, "throughput per core at 100% tracing, vs the naive proxy", "≥ 1.5x",
                             "outrigger-100", over("outrigger-100", "naive"), 1.5))

    cpu = _per_round(rounds, lambda r: r[target].cpu_s_per_1k if target in r else None)
    envoy_cpu = _per_round(rounds, lambda r: r["envoy"].cpu_s_per_1k if "envoy" in r else None)
    goals.append(Goal("CPU per 1,000 req/s, 1% tracing", "≤ 0.06 vCPU (Envoy's beside it)", target,
                      f"{spread(cpu, '{:.4f}')} vCPU; Envoy {spread(envoy_cpu, '{:.4f}')}",
                      None if not cpu else statistics.median(cpu) <= 0.06, runs=cpu))

    def p50_vs_nginx(r: Round) -> float | None:
        mine, theirs = added(r.get(target), r.get("direct"), "p50_ms"), added(r.get("nginx"), r.get("direct"),
                                                                             "p50_ms")
        return None if mine is None or theirs is None or theirs <= 0 else mine / theirs
    goals.append(_ratio_goal(rounds, "added p50 latency at 1 connection, vs nginx's added p50", "≤ 1.2x",
                             target, p50_vs_nginx, 1.2, at_most=True))

    low_mark, high_mark = (str(m) for m in settings.rss_marks)
    first = rounds[0] if rounds else {}
    r = first.get(target)
    low, high = (r.rss_after_mb.get(low_mark), r.rss_after_mb.get(high_mark)) if r else (None, None)
    growth = None if low is None or high is None else 100 * (high / low - 1)
    goals.append(Goal(f"RSS after {settings.rss_marks[1]:,} requests",
                      f"≤ 50 MB, growth ≤ 5% from {settings.rss_marks[0]:,}", target,
                      f"{num(high, '{:.1f}')} MB ({num(growth, '{:+.1f}')}% vs {num(low, '{:.1f}')} MB)",
                      None if high is None or growth is None else high <= 50 and growth <= 5))
    ready = _per_round(rounds, lambda r: r[target].ready_s if target in r else None)
    goals.append(Goal("start to ready", "≤ 0.5 s", target, f"{spread(ready, '{:.3f}')} s",
                      None if not ready else statistics.median(ready) <= 0.5, runs=ready))
    return goals + _issue6(first, settings)


def _issue6(results: Round, settings: Settings) -> list[Goal]:
    """Issue 6's goals, as the harness reported them before issue 10 (first round)."""
    goals: list[Goal] = []
    nginx, direct, naive = results.get("nginx"), results.get("direct"), results.get("naive")
    for key, need, name in (("outrigger-1", 1.3, "1%"), ("outrigger-100", 1.0, "100%")):
        value, base = rps(results.get(key)), rps(naive)
        ok = None if value is None or base is None else value / base >= need
        goals.append(Goal(f"throughput per core, all policies, tracing at {name}", f"≥ {need}x naive", key,
                          f"{ratio(value, base)} ({num(value, '{:,.0f}')} vs {num(base, '{:,.0f}')} req/s)", ok,
                          issue=6))
    one = results.get("outrigger-1")
    cpu = one.cpu_s_per_1k if one is not None else None
    goals.append(Goal("CPU per 1,000 req/s, tracing at 1%", "≤ 0.20 vCPU", "outrigger-1", f"{num(cpu)} vCPU",
                      None if cpu is None else cpu <= 0.20, issue=6))
    for key in ("outrigger-1", "outrigger-100"):
        r = results.get(key)
        if r is None:
            continue
        mine, theirs = added(r, direct, "p50_ms"), added(nginx, direct, "p50_ms")
        ok = None if mine is None or theirs is None else mine <= 1.5 * max(theirs, 0.0)
        goals.append(Goal("added p50 latency at 1 connection", "≤ 1.5x nginx's added p50", key,
                          f"{num(mine)} ms vs nginx {num(theirs)} ms ({ratio(mine, theirs)})", ok, issue=6))
        p99 = added(r, direct, "p99_ms")
        goals.append(Goal("added p99 latency at 1 connection", "≤ 1 ms", key, f"{num(p99)} ms",
                          None if p99 is None else p99 <= 1.0, issue=6))
        low, high = (r.rss_after_mb.get(str(m)) for m in settings.rss_marks)
        ok = None if low is None or high is None else high <= 60 and high <= 1.05 * low
        growth = None if low is None or high is None else 100 * (high / low - 1)
        goals.append(Goal(f"RSS after {settings.rss_marks[1]:,} requests",
                          f"≤ 60 MB and ≤ 5% above RSS after {settings.rss_marks[0]:,}", key,
                          f"{num(high, '{:.1f}')} MB ({num(growth, '{:+.1f}')}% vs {num(low, '{:.1f}')} MB)", ok,
                          issue=6))
        goals.append(Goal("start to ready", "≤ 1 s", key, f"{num(r.ready_s)} s",
                          None if r.ready_s is None else r.ready_s <= 1.0, issue=6))
    return goals


def goal_tables(goals: Sequence[Goal], rounds: int) -> list[str]:
    out: list[str] = []
    for issue, title in ((10, f"## Goals (issue 10; median (min-max) over {rounds} run{'s' * (rounds > 1)})"),
                         (6, "## Earlier goals (issue 6; first run)")):
        rows = [g for g in goals if g.issue == issue]
        if not rows:
            continue
        out += ["", title, "", "| figure | goal | target | measured | met |", "|---|---|---|---|---|"]
        for g in rows:
            verdict = "—" if g.met is None else ("**met**" if g.met else "**not met**")
            out.append(f"| {g.figure} | {g.goal} | {g.target} | {g.value} | {verdict} |")
    return out
