"""Where a py-spy profile's samples go, by layer of the request path.

``python -m tests.bench.profile_layers results/profile-outrigger-1.txt`` prints a
Markdown table: each sample of the collapsed stacks (``--profile`` writes them)
is counted under the innermost Outrigger (or library) layer on its stack, so
the edge and the upstream client include their socket writes.
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Iterable, Sequence
from pathlib import Path

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("span export thread (batching, OTLP encoding, HTTP POST)",
     ("telemetry/export.py", "otlp_wire.py", "export_health.py")),
    ("log writer threads (access log and JSON logs to their streams)", ("line_writer.py",)),
    ("OTel spans on the event loop (start, attributes, end)",
     ("telemetry/tracing.py", "server_span.py", "opentelemetry/")),
    ("metrics, live figures and access log",
     ("telemetry/metrics.py", "telemetry/lean.py", "telemetry/live.py", "access_log.py", "prometheus_client")),
    ("attempt telemetry (CLIENT span, attempt metrics)", ("telemetry/attempts.py",)),
    ("upstream client (connection, pool, head building, the upstream send)", ("upstream/",)),
    ("policy chain (rate limit, deadline, retry, breaker, bulkhead, stale resend, timeouts)",
     ("policies/", "proxy/chain.py", "timers.py")),
    ("edge (parsing, routing, headers, response, the app-side send)", ("edge/", "streams.py")),
)
LOOP = "event loop itself (uvloop: epoll, socket reads, task switching)"
OTHER = "other (threads idle in waits, interpreter)"


def layer(frames: Sequence[str]) -> str:
    """The layer of one sampled stack (outermost frame first)."""
    for frame in reversed(frames):
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
        total += int(count)
        counts[layer(stack.split(";"))] += int(count)
    return counts, total


def table(lines: Iterable[str]) -> str:
    counts, total = shares(lines)
    rows = [f"| {100 * n / total:.1f}% | {name} |" for name, n in counts.most_common()] if total else []
    return "\n".join(["| share | layer (innermost Outrigger or library layer on the stack) |", "|---:|---|",
                      *rows, "", f"samples: {total}"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path, help="py-spy raw output (profile-*.txt)")
    args = parser.parse_args(argv)
    print(table(args.profile.read_text(errors="replace").splitlines()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
