"""Replay: send spooled entries back through the running sidecar, each at most once at a time.

Run by ``outrigger dlq replay``, outside the sidecar.  Each entry goes to the
listener it first came in on (or ``--to``), so every policy of its route
applies again.  The request is the stored one plus ``x-outrigger-replay:
<id>``; the original Idempotency-Key is part of the stored headers, and the
original trace context goes as ``x-outrigger-replay-of-traceparent``, which
the route's dead-letter policy turns into a span link on the new SERVER span
(the replay starts a new trace: it is new work, linked to the old).

Exclusion: before sending an entry, a replayer takes a POSIX record lock on
one byte of ``<dir>/replay.lock`` chosen by the entry's id, then re-reads the
spool.  A second replayer (another process) cannot take that lock while the
first sends, and after it is released it sees the ``done`` mark, which is
appended and fsync'd before the lock is let go.  Locks die with their
process, so a killed replay never leaves an entry stuck.

An entry is marked ``done`` only after a non-5xx answer; anything else
appends ``replay_failed`` (its replay count goes up) and the entry stays.
Sends are sequential and paced to ``rate`` per second.
"""

from __future__ import annotations

import fcntl
import http.client
import os
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from proxy.deadletter import REPLAY_HEADER, REPLAY_OF_HEADER
from proxy.deadletter.index import EntryRef, SpoolIndex
from proxy.deadletter.record import Entry, Mark, encode_mark
from proxy.deadletter.segment import SegmentWriter

__all__ = ["ReplayReport", "SidecarUnreachable", "replay"]

_NOT_SENT = frozenset({"traceparent", "tracestate", "content-length", "host", REPLAY_HEADER, REPLAY_OF_HEADER})
_TIMEOUT_S = 60.0


class SidecarUnreachable(Exception):
    """Nothing could be sent: the sidecar's listener refused the connection."""


@dataclass
class ReplayReport:
    done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (id, why)
    busy: list[str] = field(default_factory=list)  # another replayer holds them
    dry_run: list[Entry] = field(default_factory=list)


def send(entry: Entry, base_url: str) -> int:
    """Send one entry; the answer's status (OSError when no answer came)."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=_TIMEOUT_S)
    try:
        headers = [(name, value) for name, value in entry.headers if name.lower() not in _NOT_SENT]
        connection.putrequest(entry.method, parts.path.rstrip("/") + entry.target, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.putheader(REPLAY_HEADER, entry.id)
        if entry.traceparent:
            connection.putheader(REPLAY_OF_HEADER, entry.traceparent)
        if entry.body or entry.method in ("POST", "PUT", "PATCH"):
            connection.putheader("Content-Length", str(len(entry.body)))
        connection.endheaders(entry.body or None)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def replay(directory: str, refs: Iterable[EntryRef], *, index: SpoolIndex, expired_before: float,
           target_for: Callable[[Entry], str], rate: float, dry_run: bool,
           progress: Callable[[str], None] = lambda line: None) -> ReplayReport:
    report = ReplayReport()
    interval = 1.0 / rate
    next_send = time.monotonic()
    writer = SegmentWriter(directory, 64 * 1024 * 1024)
    lock_fd = os.open(os.path.join(directory, "replay.lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        for ref in refs:
            if dry_run:
                report.dry_run.append(index.read(ref))
                continue
            offset = zlib.crc32(ref.id.encode())
            try:
                fcntl.lockf(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
            except (BlockingIOError, PermissionError):
                report.busy.append(ref.id)
                continue
            try:
                index.refresh()  # another replayer may have finished it just before we locked
                if index.resolved(ref, expired_before):
                    continue
                try:
                    entry = index.read(ref)
                except (OSError, ValueError) as exc:  # compacted away meanwhile (it expired)
                    progress(f"{ref.id}: skipped, no longer readable ({exc})")
                    continue
                time.sleep(max(0.0, next_send - time.monotonic()))
                next_send = max(next_send + interval, time.monotonic())
                url = target_for(entry)
                try:
                    status = send(entry, url)
                except ConnectionRefusedError as exc:
                    raise SidecarUnreachable(f"cannot reach the sidecar at {url}: {exc.strerror or exc}") from exc
                except (OSError, http.client.HTTPException) as exc:
                    why = f"no answer: {type(exc).__name__}: {exc}"
                else:
                    why = "" if status < 500 else f"answered {status}"
                if not why:
                    writer.append(encode_mark(Mark(id=entry.id, ts=time.time(), kind="done", detail=str(status))))
                    report.done.append(entry.id)
                    progress(f"{entry.id} {entry.method} {entry.target} -> {status}: done")
                else:
                    writer.append(encode_mark(Mark(id=entry.id, ts=time.time(), kind="replay_failed", detail=why)))
                    report.failed.append((entry.id, why))
                    progress(f"{entry.id} {entry.method} {entry.target} -> {why}: kept")
            finally:
                fcntl.lockf(lock_fd, fcntl.LOCK_UN, 1, offset)
    finally:
        os.close(lock_fd)
        writer.close()
    return report
