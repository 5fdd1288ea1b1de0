"""The sidecar's dead-letter spool: group-committed, durable appends off the event loop.

The dead-letter policy (``proxy.deadletter.policy``) encodes an entry on the
event loop and hands the bytes to ``Spool.submit``; one writer thread takes
everything queued since its last commit, appends it to this process's
segment in one write and makes it durable with one ``fdatasync`` (group
commit: a burst of failures costs one sync per batch, not one per request),
then resolves the waiting futures on the loop.  The loop never blocks on
disk: it only takes a short lock to queue.

Capacity: an entry that would take the spool past ``max_bytes`` is refused
(counted ``refused_full``); old entries are never overwritten.  Space comes
back when compaction (in the writer thread, every minute) deletes segments
whose entries are all done, purged or older than ``max_age``.  A write that
fails (disk full, read-only, directory gone) fails only that batch: its
requests get their original failure without the header, the failure is
counted and logged at most once a minute.

A reload that changes or removes ``dead_letter`` retires the spool
(``proxy.lifecycle.retiring``): once no request that may spool into it is in
flight (``users``), it is closed: what is queued is committed, then the thread
ends.  An entry that still comes its way after that goes to the spool that
replaced it (``successor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from proxy.config import DeadLetterConfig
from proxy.deadletter.index import SpoolIndex
from proxy.deadletter.segment import SegmentWriter
from proxy.telemetry.metrics import Metrics

__all__ = ["Spool"]

log = logging.getLogger("outrigger.deadletter")
_MAINTENANCE_S = 5.0  # gauges refreshed from disk (the CLI's marks included)
_COMPACT_S = 60.0
_LOG_EVERY_S = 60.0

_Item = tuple[bytes, "asyncio.Future[bool]", asyncio.AbstractEventLoop, Any]


class Spool:
    def __init__(self, config: DeadLetterConfig, metrics: Metrics, *, wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self._metrics = metrics
        self._wall = wall
        rotate = max(1024 * 1024, min(64 * 1024 * 1024, int(config.max_bytes) // 8))
        self._writer = SegmentWriter(config.dir, rotate, wall)
        self._index = SpoolIndex(config.dir)
        try:  # sizes only: reading what a previous run left is the writer thread's first job, not the loop's
            self.bytes = sum(os.stat(os.path.join(config.dir, name)).st_size for name in self._index.segment_names())
        except OSError as exc:
            raise OSError(f"dead_letter.dir {config.dir}: cannot read the spool: {exc.strerror or exc}") from exc
        self.entries = 0
        self.oldest = 0.0
        self.commits = 0  # fdatasync calls
        self.records = 0  # records they made durable
        self.write_errors = 0
        self.last_error: str | None = None
        self._last_logged: dict[str, float] = {}
        # A C-implemented queue: one cheap put per entry, and the writer blocks in get() (no Python
        # Condition, whose wait/notify cost more than the fsync's own CPU at low concurrency).
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()  # None: stop
        self._queued_bytes = 0  # changed on the event loop only (submit, and _resolve through the loop)
        self._closed = False
        # Requests inside a dead-letter policy that spools here: a spool a reload retires is
        # closed only once this is back to 0 (changed on the event loop only).
        self.users = 0
        self.successor: Spool | None = None  # the spool a reload replaced this one with
        self._publish()
        self._thread = threading.Thread(target=self._run, name="outrigger-dead-letter", daemon=True)
        self._thread.start()

    def has_room(self, size: int) -> bool:
        return self.bytes + self._queued_bytes + size <= self.config.max_bytes

    @property
    def accepting(self) -> bool:
        """False once closed with no successor (a reload removed ``dead_letter``): ``submit`` refuses all."""
        spool: Spool | None = self
        while spool is not None and spool._closed:
            spool = spool.successor
        return spool is not None

    def submit(self, record: bytes, spooled: Any) -> asyncio.Future[bool] | None:
        """Queue ``record``; the future turns True once it is durable (False: the write failed).

        None when the spool is full (or closed and not replaced).  ``spooled`` is the counter
        child incremented once the record is durable.  Once closed, records go to
        ``successor``: the writer thread has ended and nothing queued here would be written.
        """
        if self._closed:
            if self.successor is not None:
                return self.successor.submit(record, spooled)
            self.warn("closed", f"dead-letter spool {self.config.dir} is closed; new entries are refused")
            return None
        if not self.has_room(len(record)):
            self.warn("full", f"dead-letter spool {self.config.dir} is full ({self.bytes} of "
                              f"{int(self.config.max_bytes)} bytes); new entries are refused")
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        self._queued_bytes += len(record)
        self._queue.put((record, future, loop, spooled))
        return future

    def warn(self, kind: str, message: str) -> None:
        """Log ``message`` at most once a minute per kind (a broken disk must not flood the logs)."""
        now = time.monotonic()
        if now - self._last_logged.get(kind, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_logged[kind] = now
            log.error(message)

    # --- the writer thread ---

    def _run(self) -> None:
        next_maintenance = time.monotonic()  # at once: count what a previous run left
        next_compaction = time.monotonic() + _COMPACT_S
        stop = False
        while not stop:
            batch: list[_Item] = []
            try:
                item = self._queue.get(timeout=max(0.0, next_maintenance - time.monotonic()))
                while True:  # everything queued meanwhile joins this commit
                    if item is None:
                        stop = True
                    else:
                        batch.append(item)
                    item = self._queue.get_nowait()
            except queue.Empty:
                pass
            if batch:
                self._commit(batch, sum(len(item[0]) for item in batch))
            now = time.monotonic()
            if now >= next_maintenance:
                self._maintain(compact=now >= next_compaction)
                next_maintenance = now + _MAINTENANCE_S
                if now >= next_compaction:
                    next_compaction = now + _COMPACT_S
        self._writer.close()

    def _commit(self, batch: list[_Item], size: int) -> None:
        ok = True
        try:
            self._writer.append(b"".join(item[0] for item in batch))
        except OSError as exc:
            ok = False
            self.write_errors += len(batch)
            self.last_error = f"{type(exc).__name__}: {exc.strerror or exc}"
            self._metrics.dead_letter_write_errors.inc(len(batch))
            self.warn("write", f"dead-letter spool {self.config.dir}: write failed ({self.last_error}); "
                               f"{len(batch)} request(s) answered without spooling")
        else:
            self.commits += 1
            self.records += len(batch)
            self.bytes += size
            self.entries += len(batch)
            if not self.oldest:
                self.oldest = self._wall()
            for item in batch:
                item[3].inc()
            self._publish()
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[bool]]] = {}
        for _, future, loop, _ in batch:
            by_loop.setdefault(loop, []).append(future)
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(self._resolve, futures, ok, size)

    def _maintain(self, *, compact: bool) -> None:
        try:
            self._index.refresh()
            expired_before = self._wall() - self.config.max_age
            if compact:
                self._index.compact(expired_before)
            live = self._index.live(expired_before)
            self.entries, self.oldest = len(live), (live[0].ts if live else 0.0)
            self.bytes = self._index.total_bytes()
        except OSError as exc:
            self.warn("read", f"dead-letter spool {self.config.dir}: cannot read it ({exc.strerror or exc})")
        self._publish()

    def _publish(self) -> None:
        if self.successor is not None:  # retired: the gauges show the spool that replaced it
            return
        self._metrics.dead_letter_spool_bytes.set(self.bytes)
        self._metrics.dead_letter_entries.set(self.entries)
        self._metrics.dead_letter_oldest.set(self.oldest)

    def snapshot(self) -> dict[str, Any]:
        return {"dir": self.config.dir, "bytes": self.bytes, "max_bytes": int(self.config.max_bytes),
                "entries": self.entries, "oldest_entry_ts": self.oldest or None,
                "commits": self.commits, "records": self.records, "write_errors": self.write_errors,
                "last_error": self.last_error}

    def _resolve(self, futures: list[asyncio.Future[bool]], ok: bool, size: int) -> None:
        """On the loop: wake the requests of one commit."""
        self._queued_bytes -= size
        for future in futures:
            if not future.done():
                future.set_result(ok)

    @property
    def running(self) -> bool:
        """Whether the writer thread is still alive."""
        return self._thread.is_alive()

    def stop(self) -> None:
        """Refuse new entries (they go to ``successor``); the writer commits what is queued, then ends.

        Call it on the event loop, where ``submit`` runs, so no entry can be queued behind the stop.
        """
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def close(self, timeout_s: float = 2.0) -> None:
        """Commit what is queued, then stop the thread and release the segment (blocks up to ``timeout_s``)."""
        self.stop()
        self._thread.join(timeout_s)
