"""Log output that never blocks the event loop: a bounded buffer drained by a writer thread.

Both log streams go through one ``LineWriter`` each: the access log (stdout,
stream ``access``) and the JSON logs (stderr, stream ``log``).  The loop only
appends to a buffer; a daemon thread does the blocking ``write``.  When the
reader stalls (a blocking container log driver, a stuck collector) the thread
waits on the pipe, the buffer fills to ``max_bytes`` and further lines are
dropped and counted in ``outrigger_log_lines_dropped_total{stream}``, while the
sidecar keeps serving and ``/healthz`` keeps answering.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import IO

__all__ = ["DEFAULT_MAX_BYTES", "LineWriter", "dropped_lines"]

# What may wait for a stalled reader, per stream: about 1,500 access lines, ~25x a pipe's buffer.
DEFAULT_MAX_BYTES = int(os.environ.get("OUTRIGGER_LOG_BUFFER_BYTES", str(256 * 1024)))
# Lines dropped so far, per stream, in this process (stdout and stderr are the process's own).
dropped_lines: dict[str, int] = {"access": 0, "log": 0}


class LineWriter:
    """Hands lines to ``stream`` from a thread; ``write`` never blocks on the stream.

    At most ``max_bytes`` of text wait (plus what the thread is writing): a stalled
    reader costs bounded memory, never the caller's time."""

    def __init__(self, stream: IO[str], name: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.stream = stream
        self.name = name
        self._max = max_bytes
        self._pending: list[str] = []
        self._size = 0
        self._busy = False  # the thread holds text it took but has not finished writing
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None

    def write(self, lines: list[str]) -> int:
        """Queue newline-terminated ``lines`` in order until the buffer is full; the rest are
        dropped and counted.  Returns how many were queued."""
        size = sum(map(len, lines))
        with self._cond:
            if self._size + size <= self._max:  # the usual case: all of them, without a loop in Python
                self._pending.extend(lines)
                self._size += size
                queued = len(lines)
            else:
                queued = 0
                for line in lines:
                    if self._size + len(line) > self._max:
                        dropped_lines[self.name] = dropped_lines.get(self.name, 0) + len(lines) - queued
                        break
                    self._pending.append(line)
                    self._size += len(line)
                    queued += 1
            if queued:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=f"outrigger-{self.name}-writer",
                                                    daemon=True)
                    self._thread.start()
                self._cond.notify()
        return queued

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._busy = False
                    self._cond.notify_all()  # wake wait_written()
                    self._cond.wait()
                chunk = "".join(self._pending)
                self._pending.clear()
                self._size = 0
                self._busy = True
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stream loses the lines
                self.stream.write(chunk)
                self.stream.flush()

    def wait_written(self, timeout_s: float) -> bool:
        """Block until everything queued was written (at exit, in tests); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True
