"""Structured logs: JSON lines on stderr with level, message and request id.

The handler never writes on the caller's thread: lines go to a ``LineWriter``
(stream ``log``), whose thread writes them to stderr, so a stalled stderr
reader cannot block the event loop; beyond its bound lines are dropped and
counted in ``outrigger_log_lines_dropped_total{stream="log"}``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

from proxy.telemetry.line_writer import LineWriter

__all__ = ["LogLimiter", "configure_logging", "log"]

log = logging.getLogger("outrigger")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "route", "upstream", "path", "error", "config", "trigger", "details"):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class NonBlockingHandler(logging.Handler):
    """Formats on the caller's thread, writes on the ``LineWriter``'s."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # as logging.StreamHandler does: a broken record is reported, not raised
            self.handleError(record)
            return
        self.writer.write([line])

    def flush(self) -> None:
        # Called by logging.shutdown() at exit: the last lines (a fatal error) get out, within a bound.
        self.writer.wait_written(1.0)


def configure_logging(level: str = "info") -> None:
    handler = NonBlockingHandler(LineWriter(sys.stderr, "log"))
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp logs every malformed request at error level with a traceback; keep them terse.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.access").disabled = True


class LogLimiter:
    """At most one line per cause per interval, for causes that could otherwise log on every request.

    The line says how many occurrences it stands for; the count of the ones
    held back is reported with the next line of the same cause.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0) -> None:
        self._log = logger
        self._interval = interval_s
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()  # the exporter thread logs through these too

    def log(self, level: int, cause: str, message: str, exc_info: bool = False, **extra: Any) -> bool:
        """Log ``message`` unless ``cause`` was logged less than an interval ago; True when logged."""
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(cause, 0.0):
                self._held[cause] = self._held.get(cause, 0) + 1
                return False
            self._next[cause] = now + self._interval
            held = self._held.pop(cause, 0)
        suffix = f" ({held} more since the last report; next report in {self._interval:.0f}s at the earliest)" \
            if held else f" (further occurrences reported at most every {self._interval:.0f}s)"
        self._log.log(level, message + suffix, exc_info=exc_info, extra=extra or None)
        return True

    def info(self, cause: str, message: str, **extra: Any) -> bool:
        return self.log(logging.INFO, cause, message, **extra)

    def warning(self, cause: str, message: str, **extra: Any) -> bool:
        return self.log(logging.WARNING, cause, message, **extra)
