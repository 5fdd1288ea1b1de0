"""Where a py-spy profile's samples go, by layer of the request path.

``python -m tests.bench.profile_layers results/profile-outrigger-1.txt`` prints a
Markdown table: each sample of the collapsed stacks (``--profile`` writes them)
is counted under the innermost Outrigger (or library) layer on its stack, so
the edge and the upstream client include their socket writes.

A compiled build (setup.py) is profiled with ``py-spy --native``: its modules
show as mypyc's C functions (``CPyDef_retry___Retry___...``), which are mapped
back to their source module here.  Native stacks also show threads sleeping in
a wait; those samples are no CPU and are left out of the shares.
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from proxy.compiled import COMPILED

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("span export thread (batching, OTLP encoding, HTTP POST)",
     ("telemetry/export.py", "otlp_wire.py", "export_health.py")),
    ("log writer threads (access log and JSON logs to their streams)", ("line_writer.py",)),
    ("OTel spans on the event loop (start, attributes, end)",
     ("telemetry/tracing.py", "request_trace.py", "lean_span.py", "server_span.py", "client_span.py",
      "opentelemetry/")),
    ("metrics, live figures and access log",
     ("telemetry/metrics.py", "telemetry/labels.py", "telemetry/lean.py", "telemetry/live.py", "access_log.py",
      "prometheus_client")),
    ("attempt telemetry (CLIENT span, attempt metrics)", ("telemetry/attempts.py",)),
    ("upstream client (connection, pool, head building, the upstream send)", ("upstream/",)),
    ("policy chain (rate limit, deadline, retry, breaker, bulkhead, stale resend, timeouts)",
     ("policies/", "proxy/chain.py", "timers.py")),
    ("edge (parsing, routing, headers, response, the app-side send)", ("edge/", "streams.py")),
)
LOOP = "event loop itself (uvloop: epoll, socket reads, task switching)"
OTHER = "other (threads idle in waits, interpreter)"
IDLE = "idle: a thread asleep in a lock or queue wait (no CPU; not in the shares)"
_WAITS = ("PyThread_acquire_lock_timed", "SimpleQueue_get_impl", "pthread_cond_", "futex")
# mypyc's C name of a compiled function: CPyDef_<module>___..., CPyDunder_am_send<module>___...
_NATIVE = re.compile(r"^CPy(?:Def_|Py_|Dunder_am_send|Dunder_)(?P<module>[a-z][a-z0-9_]*?)___")
_SOURCES = {Path(path).stem: path for path in COMPILED}


def _source(frame: str) -> str:
    """A compiled function's frame, with the source module it was compiled from appended."""
    found = _NATIVE.match(frame)
    path = _SOURCES.get(found.group("module")) if found else None
    return f"{frame} ({path})" if path else frame


def layer(frames: Sequence[str]) -> str:
    """The layer of one sampled stack (outermost frame first)."""
    if any(wait in frame for frame in frames[-3:] for wait in _WAITS):  # (below it: libc, often unnamed)
        return IDLE
    for frame in map(_source, reversed(frames)):
        for name, needles in LAYERS:
            if any(needle in frame for needle in needles):
                return name
    if any("runners.py" in frame or "base_events" in frame for frame in frames):
        return LOOP
    return OTHER


def shares(lines: Iterable[str]) -> tuple[collections.Counter[str], int]:
    """Samples per layer and in all, from py-spy's raw (collapsed) output."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit():
            continue  # a frame py-spy could not name, split over lines
        where = layer(stack.split(";"))
        counts[where] += int(count)
        if where != IDLE:
            total += int(count)
    return counts, total


def table(lines: Iterable[str]) -> str:
    counts, total = shares(lines)
    idle = counts.pop(IDLE, 0)
    rows = [f"| {100 * n / total:.1f}% | {name} |" for name, n in counts.most_common()] if total else []
    return "\n".join(["| share | layer (innermost Outrigger or library layer on the stack) |", "|---:|---|",
                      *rows, "", f"samples: {total}" + (f" (and {idle} of threads asleep in waits)" if idle else "")])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path, help="py-spy raw output (profile-*.txt)")
    args = parser.parse_args(argv)
    print(table(args.profile.read_text(errors="replace").splitlines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
